//! File-and-line diagnostics for configuration and policy files.
//!
//! Every validation error names the file and, where it can be known, the line, so that
//! `airlock check` reads like a compiler: `conf/airlock.toml:12: dataset path does not exist`.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// One problem found in one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub message: String,
}

impl Diagnostic {
    pub fn new(file: impl AsRef<Path>, line: Option<usize>, message: impl Into<String>) -> Self {
        Self {
            file: file.as_ref().to_path_buf(),
            line,
            message: message.into(),
        }
    }

    /// A diagnostic located at a byte span of `text` (the file's contents).
    pub fn at_span(
        file: impl AsRef<Path>,
        text: &str,
        span: Option<Range<usize>>,
        message: impl Into<String>,
    ) -> Self {
        Self::new(file, span.map(|s| line_of(text, s.start)), message)
    }

    /// Turns a TOML parse or shape error into a diagnostic with its line.
    pub fn from_toml(file: impl AsRef<Path>, text: &str, err: &toml::de::Error) -> Self {
        Self::at_span(file, text, err.span(), err.message().trim().to_string())
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{}: {}", self.file.display(), line, self.message),
            None => write!(f, "{}: {}", self.file.display(), self.message),
        }
    }
}

/// A non-empty list of diagnostics: what a failed validation returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl Diagnostics {
    pub fn one(d: Diagnostic) -> Self {
        Self(vec![d])
    }
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Diagnostics {}

/// 1-based line number of a byte offset.
pub fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

/// Collects diagnostics while a validation goes on, so that one run reports them all.
#[derive(Debug, Default)]
pub struct Collector(Vec<Diagnostic>);

impl Collector {
    pub fn push(&mut self, d: Diagnostic) {
        self.0.push(d);
    }

    pub fn extend(&mut self, d: Diagnostics) {
        self.0.extend(d.0);
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `Ok(value)` when nothing was collected.
    pub fn finish<T>(self, value: T) -> Result<T, Diagnostics> {
        if self.0.is_empty() {
            Ok(value)
        } else {
            Err(Diagnostics(self.0))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_one_based() {
        let text = "a\nb\nc";
        assert_eq!(line_of(text, 0), 1);
        assert_eq!(line_of(text, 2), 2);
        assert_eq!(line_of(text, 4), 3);
        assert_eq!(line_of(text, 99), 3);
    }

    #[test]
    fn toml_errors_carry_lines() {
        let text = "a = 1\nb = \n";
        let err = toml::from_str::<toml::Table>(text).unwrap_err();
        let d = Diagnostic::from_toml("x.toml", text, &err);
        assert_eq!(d.line, Some(2));
        assert!(d.to_string().starts_with("x.toml:2: "));
    }
}
