//! Greedy k-center coreset selection (PatchCore's memory-bank subsampling): repeatedly take
//! the patch farthest from everything chosen so far, so the bank covers the whole normal
//! feature distribution with few rows. Distances are computed on a fixed random projection
//! (Johnson-Lindenstrauss) to keep selection fast on a CPU.

/// Deterministic xorshift64* generator (no dependency, same picks on every machine).
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Standard normal sample (Box-Muller).
    fn normal(&mut self) -> f32 {
        let u1 = ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
        let u2 = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }
}

/// Projects `n` rows of length `dim` to `out_dim` with a seeded Gaussian matrix.
fn project(x: &[f32], n: usize, dim: usize, out_dim: usize) -> Vec<f32> {
    if out_dim >= dim {
        return x.to_vec();
    }
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let scale = 1.0 / (out_dim as f32).sqrt();
    let p: Vec<f32> = (0..dim * out_dim).map(|_| rng.normal() * scale).collect();
    let mut out = vec![0f32; n * out_dim];
    for (row, o) in x.chunks_exact(dim).zip(out.chunks_exact_mut(out_dim)) {
        for (d, v) in row.iter().enumerate() {
            let prow = &p[d * out_dim..(d + 1) * out_dim];
            for (acc, w) in o.iter_mut().zip(prow) {
                *acc += v * w;
            }
        }
    }
    out
}

/// Squared Euclidean distance, summed in eight independent lanes so the compiler can keep it
/// in SIMD registers (a plain iterator sum is sequential in f32 and does not vectorize).
fn sq_dist(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| (x - y) * (x - y))
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            let d = x[l] - y[l];
            acc[l] += d * d;
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Picks `k` row indices of `x` (`n` rows of `dim`) by greedy k-center on a projection to
/// `proj_dim` dimensions. Deterministic. Returns all rows if `k >= n`.
pub fn greedy_k_center(x: &[f32], dim: usize, k: usize, proj_dim: usize) -> Vec<usize> {
    let n = x.len() / dim;
    if k >= n {
        return (0..n).collect();
    }
    let pd = proj_dim.min(dim).max(1);
    let z = project(x, n, dim, pd);
    let rows: Vec<&[f32]> = z.chunks_exact(pd).collect();
    let mut chosen = Vec::with_capacity(k);
    let mut min_d = vec![f32::INFINITY; n];
    let mut next = 0usize;
    for _ in 0..k {
        chosen.push(next);
        let c = rows[next];
        let mut best = (0usize, -1f32);
        for (i, (row, m)) in rows.iter().zip(min_d.iter_mut()).enumerate() {
            let d = sq_dist(row, c);
            if d < *m {
                *m = d;
            }
            if *m > best.1 {
                best = (i, *m);
            }
        }
        next = best.0;
    }
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_every_cluster_before_repeating_one() {
        // Four tight clusters of 50 points in 8 dimensions; k = 4 must take one from each.
        let centers = [
            [0.0f32; 8],
            [10.0; 8],
            [-10.0; 8],
            [0.0, 10.0, 0.0, -10.0, 0.0, 10.0, 0.0, -10.0],
        ];
        let mut rng = Rng(7);
        let mut x = Vec::new();
        for c in &centers {
            for _ in 0..50 {
                x.extend(c.iter().map(|v| v + 0.01 * rng.normal()));
            }
        }
        let picks = greedy_k_center(&x, 8, 4, 8);
        let mut clusters: Vec<usize> = picks.iter().map(|i| i / 50).collect();
        clusters.sort();
        assert_eq!(clusters, [0, 1, 2, 3]);
        // With a projection to 4 dimensions the clusters stay apart.
        let mut c2: Vec<usize> = greedy_k_center(&x, 8, 4, 4)
            .iter()
            .map(|i| i / 50)
            .collect();
        c2.sort();
        assert_eq!(c2, [0, 1, 2, 3]);
    }

    #[test]
    fn k_at_least_n_keeps_everything() {
        assert_eq!(greedy_k_center(&[1.0, 2.0, 3.0], 1, 5, 1), [0, 1, 2]);
    }
}
