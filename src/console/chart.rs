//! Queries per hour by decision, over the last 24 hours, as a stacked bar chart. The
//! geometry is computed here; `activity.html` draws it as inline SVG (colours come from
//! the style sheet's classes, so the page needs no inline style).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Hours the chart covers.
pub const HOURS: usize = 24;
/// Decisions of query records, bottom to top of a bar.
pub const SERIES: [&str; 5] = [
    "released",
    "approval_pending",
    "approval_denied",
    "refused",
    "failed",
];

const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 180.0;
const LEFT: f64 = 36.0;
const BOTTOM: f64 = 20.0;
const TOP: f64 = 8.0;

/// One coloured piece of a bar.
#[derive(Debug, Clone, PartialEq)]
pub struct Segment {
    pub x: String,
    pub y: String,
    pub width: String,
    pub height: String,
    pub class: &'static str,
    pub title: String,
}

/// A label on an axis.
#[derive(Debug, Clone, PartialEq)]
pub struct Tick {
    pub x: String,
    pub y: String,
    pub label: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Chart {
    pub width: String,
    pub height: String,
    pub segments: Vec<Segment>,
    pub hours: Vec<Tick>,
    pub counts: Vec<Tick>,
    /// The axis line.
    pub axis_y: String,
    pub axis_x0: String,
    pub axis_x1: String,
    pub total: u64,
    pub legend: Vec<(&'static str, u64)>,
}

fn num(v: f64) -> String {
    format!("{v:.1}")
}

/// The chart of `(rfc3339 time, decision)` pairs in the 24 hours before `now`.
pub fn hourly<'a>(records: impl Iterator<Item = (&'a str, &'a str)>, now: SystemTime) -> Chart {
    let now_s = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    // Bars are whole UTC hours; the last one is the current hour.
    let last_hour = now_s / 3600;
    let first_hour = last_hour + 1 - HOURS as u64;
    let mut counts = [[0u64; SERIES.len()]; HOURS];
    let mut totals = [0u64; SERIES.len()];
    for (time, decision) in records {
        let Ok(t) = humantime::parse_rfc3339(time) else {
            continue;
        };
        let h = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) / 3600;
        let Some(series) = SERIES.iter().position(|s| *s == decision) else {
            continue;
        };
        if (first_hour..=last_hour).contains(&h) {
            counts[(h - first_hour) as usize][series] += 1;
            totals[series] += 1;
        }
    }
    let max = counts
        .iter()
        .map(|c| c.iter().sum::<u64>())
        .max()
        .unwrap_or(0)
        .max(1);
    let plot_h = HEIGHT - BOTTOM - TOP;
    let slot = (WIDTH - LEFT) / HOURS as f64;
    let bar = slot * 0.7;
    let mut segments = Vec::new();
    let mut hours = Vec::new();
    for (i, c) in counts.iter().enumerate() {
        let x = LEFT + i as f64 * slot + (slot - bar) / 2.0;
        let mut y = HEIGHT - BOTTOM;
        let hour = first_hour + i as u64;
        let start = UNIX_EPOCH + Duration::from_secs(hour * 3600);
        let label = humantime::format_rfc3339_seconds(start).to_string();
        let hh = &label[11..13];
        for (s, n) in c.iter().enumerate() {
            if *n == 0 {
                continue;
            }
            let h = plot_h * *n as f64 / max as f64;
            y -= h;
            segments.push(Segment {
                x: num(x),
                y: num(y),
                width: num(bar),
                height: num(h),
                class: SERIES[s],
                title: format!(
                    "{}:00 UTC, {}: {n}",
                    &label[..13].replace('T', " "),
                    SERIES[s]
                ),
            });
        }
        if i % 3 == 0 {
            hours.push(Tick {
                x: num(x + bar / 2.0),
                y: num(HEIGHT - 5.0),
                label: format!("{hh}h"),
            });
        }
    }
    let counts_ticks = [0, max / 2, max]
        .into_iter()
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .map(|v| Tick {
            x: num(LEFT - 6.0),
            y: num(HEIGHT - BOTTOM - plot_h * v as f64 / max as f64 + 4.0),
            label: v.to_string(),
        })
        .collect();
    Chart {
        width: num(WIDTH),
        height: num(HEIGHT),
        segments,
        hours,
        counts: counts_ticks,
        axis_y: num(HEIGHT - BOTTOM),
        axis_x0: num(LEFT),
        axis_x1: num(WIDTH),
        total: totals.iter().sum(),
        legend: SERIES.iter().copied().zip(totals).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_the_last_24_hours_by_decision() {
        let now = humantime::parse_rfc3339("2026-01-02T10:30:00Z").unwrap();
        let records = [
            ("2026-01-02T10:01:00.123Z", "released"),
            ("2026-01-02T10:02:00Z", "released"),
            ("2026-01-02T10:03:00Z", "refused"),
            ("2026-01-02T09:59:59Z", "approval_pending"),
            ("2026-01-01T10:59:59Z", "released"), // 24 hours before the current hour
            ("2026-01-01T11:00:00Z", "failed"),   // the first bar
            ("2026-01-02T10:04:00Z", "approved"), // not a query decision
            ("garbage", "released"),
        ];
        let c = hourly(records.iter().copied(), now);
        assert_eq!(c.total, 5);
        assert_eq!(
            c.legend,
            vec![
                ("released", 2),
                ("approval_pending", 1),
                ("approval_denied", 0),
                ("refused", 1),
                ("failed", 1)
            ]
        );
        // The current hour's bar is the tallest (3): released below refused.
        let last: Vec<_> = c
            .segments
            .iter()
            .filter(|s| s.title.starts_with("2026-01-02 10"))
            .collect();
        assert_eq!(last.len(), 2);
        assert_eq!(last[0].class, "released");
        assert_eq!(last[1].class, "refused");
        let tops: f64 = last[1].y.parse().unwrap();
        assert!((tops - TOP).abs() < 0.2, "the tallest bar reaches the top");
        assert_eq!(c.hours.len(), 8);
    }
}
