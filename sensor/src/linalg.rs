//! The little dense linear algebra the baseline models need, on small symmetric matrices
//! (tens of features): covariance with Ledoit-Wolf shrinkage and a symmetric eigen
//! decomposition (cyclic Jacobi, accurate to machine precision for these sizes).

/// Row-major square matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct Square {
    pub n: usize,
    pub data: Vec<f64>,
}

impl Square {
    pub fn zeros(n: usize) -> Self {
        Square {
            n,
            data: vec![0.0; n * n],
        }
    }

    pub fn identity(n: usize) -> Self {
        let mut m = Self::zeros(n);
        for i in 0..n {
            m.data[i * n + i] = 1.0;
        }
        m
    }

    pub fn get(&self, i: usize, j: usize) -> f64 {
        self.data[i * self.n + j]
    }

    pub fn set(&mut self, i: usize, j: usize, v: f64) {
        self.data[i * self.n + j] = v;
    }

    /// `self · v`.
    pub fn mul_vec(&self, v: &[f64]) -> Vec<f64> {
        (0..self.n)
            .map(|i| {
                self.data[i * self.n..(i + 1) * self.n]
                    .iter()
                    .zip(v)
                    .map(|(a, b)| a * b)
                    .sum()
            })
            .collect()
    }
}

/// Mean of each column of `rows` (all rows have the same length).
pub fn column_means(rows: &[Vec<f64>]) -> Vec<f64> {
    let d = rows.first().map_or(0, Vec::len);
    let mut mean = vec![0.0; d];
    for r in rows {
        for (m, x) in mean.iter_mut().zip(r) {
            *m += x;
        }
    }
    let n = rows.len().max(1) as f64;
    mean.iter_mut().for_each(|m| *m /= n);
    mean
}

/// Sample covariance of centred rows (divides by n).
pub fn covariance(centred: &[Vec<f64>]) -> Square {
    let d = centred.first().map_or(0, Vec::len);
    let mut c = Square::zeros(d);
    for r in centred {
        for (i, ri) in r.iter().enumerate() {
            let row = &mut c.data[i * d..(i + 1) * d];
            for (cij, rj) in row[i..].iter_mut().zip(&r[i..]) {
                *cij += ri * rj;
            }
        }
    }
    let n = centred.len().max(1) as f64;
    for i in 0..d {
        for j in i..d {
            let v = c.data[i * d + j] / n;
            c.data[i * d + j] = v;
            c.data[j * d + i] = v;
        }
    }
    c
}

/// Ledoit-Wolf shrinkage of the covariance of centred rows towards `mu·I` (mu = mean
/// variance). Returns the shrunk covariance and the shrinkage intensity in 0..=1.
/// Ledoit & Wolf (2004), "A well-conditioned estimator for large-dimensional covariance
/// matrices", the estimator of the optimal intensity as in their Lemma 3.2-3.4.
pub fn ledoit_wolf(centred: &[Vec<f64>]) -> (Square, f64) {
    let s = covariance(centred);
    let d = s.n;
    let n = centred.len().max(1) as f64;
    if d == 0 {
        return (s, 0.0);
    }
    let mu = (0..d).map(|i| s.get(i, i)).sum::<f64>() / d as f64;
    // d² = ||S - mu I||²_F / d
    let mut delta2 = 0.0;
    for i in 0..d {
        for j in 0..d {
            let t = s.get(i, j) - if i == j { mu } else { 0.0 };
            delta2 += t * t;
        }
    }
    delta2 /= d as f64;
    // b̄² = (1/n²) Σ_k ||x_k x_kᵀ - S||²_F / d
    let mut beta2 = 0.0;
    for r in centred {
        let mut acc = 0.0;
        for i in 0..d {
            for j in 0..d {
                let t = r[i] * r[j] - s.get(i, j);
                acc += t * t;
            }
        }
        beta2 += acc / d as f64;
    }
    beta2 /= n * n;
    let beta2 = beta2.min(delta2);
    let shrink = if delta2 > 0.0 { beta2 / delta2 } else { 1.0 };
    let mut out = s.clone();
    for v in out.data.iter_mut() {
        *v *= 1.0 - shrink;
    }
    for i in 0..d {
        out.data[i * d + i] += shrink * mu;
    }
    (out, shrink)
}

/// Eigen decomposition of a symmetric matrix: eigenvalues in decreasing order and the
/// matching unit eigenvectors as the rows of the returned matrix.
pub fn symmetric_eigen(m: &Square) -> (Vec<f64>, Square) {
    let n = m.n;
    let mut a = m.clone();
    let mut v = Square::identity(n);
    for _sweep in 0..100 {
        let mut off = 0.0;
        for i in 0..n {
            for j in (i + 1)..n {
                off += a.get(i, j) * a.get(i, j);
            }
        }
        let scale: f64 = a
            .data
            .iter()
            .map(|x| x * x)
            .sum::<f64>()
            .max(f64::MIN_POSITIVE);
        if off <= 1e-30 * scale {
            break;
        }
        for p in 0..n {
            for q in (p + 1)..n {
                let apq = a.get(p, q);
                if apq.abs() < f64::MIN_POSITIVE {
                    continue;
                }
                let app = a.get(p, p);
                let aqq = a.get(q, q);
                let theta = (aqq - app) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                // Rotate rows/columns p and q.
                for k in 0..n {
                    let akp = a.get(k, p);
                    let akq = a.get(k, q);
                    a.set(k, p, c * akp - s * akq);
                    a.set(k, q, s * akp + c * akq);
                }
                for k in 0..n {
                    let apk = a.get(p, k);
                    let aqk = a.get(q, k);
                    a.set(p, k, c * apk - s * aqk);
                    a.set(q, k, s * apk + c * aqk);
                }
                for k in 0..n {
                    let vkp = v.get(k, p);
                    let vkq = v.get(k, q);
                    v.set(k, p, c * vkp - s * vkq);
                    v.set(k, q, s * vkp + c * vkq);
                }
            }
        }
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&i, &j| a.get(j, j).total_cmp(&a.get(i, i)));
    let values = order.iter().map(|&i| a.get(i, i)).collect();
    let mut vectors = Square::zeros(n);
    for (row, &col) in order.iter().enumerate() {
        for k in 0..n {
            vectors.set(row, k, v.get(k, col));
        }
    }
    (values, vectors)
}

/// `q`-quantile (0..=1) of `values` by linear interpolation; NaN-free input expected.
pub fn quantile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let pos = q.clamp(0.0, 1.0) * (v.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    let frac = pos - lo as f64;
    v[lo] * (1.0 - frac) + v[hi] * frac
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eigen_reconstructs_the_matrix() {
        let mut m = Square::zeros(4);
        let vals = [
            [4.0, 1.0, 0.5, 0.2],
            [1.0, 3.0, 0.3, 0.1],
            [0.5, 0.3, 2.0, 0.7],
            [0.2, 0.1, 0.7, 1.0],
        ];
        for (i, row) in vals.iter().enumerate() {
            for (j, v) in row.iter().enumerate() {
                m.set(i, j, *v);
            }
        }
        let (l, v) = symmetric_eigen(&m);
        assert!(l.windows(2).all(|w| w[0] >= w[1]));
        for i in 0..4 {
            for j in 0..4 {
                let r: f64 = (0..4).map(|k| v.get(k, i) * l[k] * v.get(k, j)).sum();
                assert!((r - m.get(i, j)).abs() < 1e-10, "{i},{j}: {r}");
            }
        }
        // Orthonormal rows.
        for a in 0..4 {
            for b in 0..4 {
                let dot: f64 = (0..4).map(|k| v.get(a, k) * v.get(b, k)).sum();
                assert!((dot - if a == b { 1.0 } else { 0.0 }).abs() < 1e-10);
            }
        }
    }

    #[test]
    fn shrinkage_is_strong_with_few_rows_and_weak_with_many() {
        // Deterministic pseudo-random rows of independent unit-variance columns.
        let mut state = 12345u64;
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 11) as f64 / (1u64 << 53) as f64) * 12f64.sqrt() - 3f64.sqrt()
        };
        // Strongly correlated columns: the identity target is wrong, so with many rows the
        // sample covariance should win.
        let rows = |n: usize, next: &mut dyn FnMut() -> f64| -> Vec<Vec<f64>> {
            (0..n)
                .map(|_| {
                    let common = next();
                    (0..10).map(|_| common + 0.3 * next()).collect()
                })
                .collect()
        };
        let few = rows(12, &mut next);
        let many = rows(5000, &mut next);
        let centre = |r: &[Vec<f64>]| {
            let m = column_means(r);
            r.iter()
                .map(|x| x.iter().zip(&m).map(|(a, b)| a - b).collect())
                .collect::<Vec<Vec<f64>>>()
        };
        let (_, s_few) = ledoit_wolf(&centre(&few));
        let (c_many, s_many) = ledoit_wolf(&centre(&many));
        assert!(s_few > s_many, "{s_few} vs {s_many}");
        assert!(s_many < 0.05, "{s_many}");
        assert!(
            (c_many.get(0, 0) - 1.09).abs() < 0.1,
            "{}",
            c_many.get(0, 0)
        );
    }

    #[test]
    fn quantile_interpolates() {
        assert_eq!(quantile(&[3.0, 1.0, 2.0], 0.5), 2.0);
        assert_eq!(quantile(&[0.0, 10.0], 0.25), 2.5);
    }
}
