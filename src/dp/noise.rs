//! Exact discrete Laplace noise (Canonne, Kamath, Steinke 2020, "The Discrete Gaussian
//! for Differential Privacy", Algorithms 1 and 2), over a cryptographic generator.
//!
//! No floating point touches a sample: the scale is a rational `num/den`, Bernoulli
//! trials with rational or `exp(-rational)` probabilities use only integer uniforms
//! drawn by rejection (unbiased), so the output distribution is exactly
//! `P(Y = y) ∝ exp(-|y| · den / num)` (no Mironov 2012 floating-point holes).
//! The production generator is the operating system's ([`os_rng`]); tests pass a
//! seeded ChaCha20. Floats appear only in the *reporting* helpers ([`tail_k`]), which
//! compute thresholds and interval widths, never samples.

use rand::RngCore;

/// The operating system's generator (`getrandom`), the only one production code uses.
pub fn os_rng() -> impl RngCore {
    use rand::TryRngCore;
    rand::rngs::OsRng.unwrap_err()
}

/// A uniform integer in `0..n` (n > 0), by rejection: unbiased.
pub fn uniform_below(rng: &mut dyn RngCore, n: u128) -> u128 {
    assert!(n > 0, "uniform_below(0)");
    if n <= u64::MAX as u128 {
        let n64 = n as u64;
        // Reject the 2^64 mod n smallest values so every residue is equally likely.
        let reject_below = n64.wrapping_neg() % n64;
        loop {
            let x = rng.next_u64();
            if x >= reject_below {
                return (x % n64) as u128;
            }
        }
    }
    let reject_below = n.wrapping_neg() % n;
    loop {
        let x = ((rng.next_u64() as u128) << 64) | rng.next_u64() as u128;
        if x >= reject_below {
            return x % n;
        }
    }
}

/// Bernoulli(num/den), 0 <= num <= den.
fn bernoulli(rng: &mut dyn RngCore, num: u128, den: u128) -> bool {
    uniform_below(rng, den) < num
}

/// Bernoulli(exp(-num/den)) (CKS20 Algorithm 1).
pub fn bernoulli_exp(rng: &mut dyn RngCore, num: u128, den: u128) -> bool {
    if num <= den {
        // exp(-γ) for γ in [0, 1]: K = the first k with Bernoulli(γ/k) false; return K odd.
        let mut k: u128 = 1;
        loop {
            let Some(kd) = den.checked_mul(k) else {
                // k this large happens with probability below 1/k!: treat as the end.
                return k % 2 == 1;
            };
            if !bernoulli(rng, num, kd) {
                return k % 2 == 1;
            }
            k += 1;
        }
    }
    for _ in 0..num / den {
        if !bernoulli_exp(rng, 1, 1) {
            return false;
        }
    }
    bernoulli_exp(rng, num % den, den)
}

/// One sample of the discrete Laplace distribution of scale `num/den` (CKS20
/// Algorithm 2): `P(Y = y) = (1 - α)/(1 + α) · α^|y|` with `α = exp(-den/num)`.
pub fn discrete_laplace(rng: &mut dyn RngCore, num: u128, den: u128) -> i128 {
    assert!(
        num > 0 && den > 0,
        "discrete Laplace scale must be positive"
    );
    // CKS20 Algorithm 2 samples Lap_Z(t/s).
    let (t, s) = (num, den);
    loop {
        let u = uniform_below(rng, t);
        if !bernoulli_exp(rng, u, t) {
            continue;
        }
        let mut v: u128 = 0;
        while bernoulli_exp(rng, 1, 1) {
            v += 1;
        }
        let Some(x) = t.checked_mul(v).and_then(|tv| tv.checked_add(u)) else {
            continue;
        };
        let y = x / s;
        let negative = bernoulli(rng, 1, 2);
        if negative && y == 0 {
            continue;
        }
        let y = i128::try_from(y).unwrap_or(i128::MAX);
        return if negative { -y } else { y };
    }
}

/// Denominator of ε as a rational: ε is used (and charged) in millionths.
pub const EPSILON_DEN: u128 = 1_000_000;

/// ε in millionths, rounded down (the query spends at most what it asked for).
pub fn epsilon_micros(epsilon: f64) -> u128 {
    (epsilon * EPSILON_DEN as f64).floor().max(0.0) as u128
}

/// The rational scale `Δ/ε` of the noise for a measurement of L1 sensitivity `delta`
/// (an integer, in the measurement's units) with `eps_micros` millionths of ε.
pub fn scale(sensitivity: u128, eps_micros: u128) -> Option<(u128, u128)> {
    (eps_micros > 0 && sensitivity > 0)
        .then(|| Some((sensitivity.checked_mul(EPSILON_DEN)?, eps_micros)))
        .flatten()
}

/// The smallest `k >= 0` with `P(Z >= k + 1) <= p` for Z discrete Laplace with scale
/// `b`: `P(Z >= m) = α^m/(1 + α)`, `α = exp(-1/b)`. Used for τ and interval widths
/// (reporting only; it is computed, not sampled).
pub fn tail_k(b: f64, p: f64) -> u64 {
    let alpha = (-1.0 / b).exp();
    if alpha <= 0.0 {
        return 0;
    }
    let m = ((p * (1.0 + alpha)).ln() / alpha.ln()).ceil();
    (m - 1.0).max(0.0) as u64
}

/// Half-width of the central `1 - miss` interval of discrete Laplace noise with scale
/// `b`: `P(|Z| > k) <= miss`.
pub fn half_width(b: f64, miss: f64) -> u64 {
    tail_k(b, miss / 2.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn rng(seed: u64) -> rand_chacha::ChaCha20Rng {
        rand_chacha::ChaCha20Rng::seed_from_u64(seed)
    }

    #[test]
    fn uniform_is_uniform() {
        let mut r = rng(1);
        let mut hist = [0u32; 7];
        for _ in 0..70_000 {
            hist[uniform_below(&mut r, 7) as usize] += 1;
        }
        // Each bin: mean 10000, sd ~93; 6 sd is far beyond chance.
        assert!(
            hist.iter().all(|&h| (9_440..=10_560).contains(&h)),
            "{hist:?}"
        );
    }

    #[test]
    fn bernoulli_exp_has_the_right_mean() {
        let mut r = rng(2);
        for (num, den) in [(1u128, 2u128), (1, 1), (5, 2), (3, 1)] {
            let p = (-(num as f64) / den as f64).exp();
            let n = 100_000;
            let hits = (0..n).filter(|_| bernoulli_exp(&mut r, num, den)).count();
            let sd = (p * (1.0 - p) / n as f64).sqrt();
            let got = hits as f64 / n as f64;
            assert!((got - p).abs() < 6.0 * sd, "{num}/{den}: {got} vs {p}");
        }
    }

    /// The empirical pmf matches (1-α)/(1+α) α^|y| at every y with enough mass.
    #[test]
    fn discrete_laplace_matches_its_pmf() {
        let mut r = rng(3);
        let (num, den) = (5u128, 2u128); // scale 2.5
        let alpha = (-(den as f64) / num as f64).exp();
        let n = 200_000;
        let mut counts = std::collections::HashMap::<i128, u32>::new();
        let mut sum = 0i128;
        for _ in 0..n {
            let y = discrete_laplace(&mut r, num, den);
            sum += y;
            *counts.entry(y).or_default() += 1;
        }
        for y in -6i128..=6 {
            let p = (1.0 - alpha) / (1.0 + alpha) * alpha.powi(y.unsigned_abs() as i32);
            let got = *counts.get(&y).unwrap_or(&0) as f64 / n as f64;
            let sd = (p * (1.0 - p) / n as f64).sqrt();
            assert!((got - p).abs() < 6.0 * sd, "y={y}: {got} vs {p}");
        }
        // Symmetric: mean 0 within 6 sd (variance 2α/(1-α)^2).
        let var = 2.0 * alpha / (1.0 - alpha).powi(2);
        assert!((sum as f64 / n as f64).abs() < 6.0 * (var / n as f64).sqrt());
    }

    #[test]
    fn large_scales_do_not_overflow() {
        let mut r = rng(4);
        let (num, den) = scale(3 * 200_000_000, epsilon_micros(0.25)).unwrap();
        for _ in 0..1_000 {
            let y = discrete_laplace(&mut r, num, den);
            assert!(y.unsigned_abs() < 200_000_000 * 3 * 4 * 100);
        }
    }

    #[test]
    fn tails_and_widths() {
        // b = 1: α = e^-1, P(Z >= m) = α^m/(1+α).
        let alpha = (-1.0f64).exp();
        let k = tail_k(1.0, 1e-6);
        assert!(alpha.powi(k as i32 + 1) / (1.0 + alpha) <= 1e-6);
        assert!(alpha.powi(k as i32) / (1.0 + alpha) > 1e-6);
        let h = half_width(4.0, 0.05);
        let a4 = (-0.25f64).exp();
        assert!(2.0 * a4.powi(h as i32 + 1) / (1.0 + a4) <= 0.05);
    }
}
