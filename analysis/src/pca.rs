//! Principal components of many latent vectors (thousands of rows, widths up to 5280) by
//! randomized PCA (Halko, Martinsson & Tropp 2011): a Gaussian range finder with a few power
//! iterations, then an exact eigen-decomposition of the small projected problem.
//!
//! Every product with the data runs as Burn tensors on the data's device; only the `l × l`
//! Gram matrices (`l` = components + oversampling) and the `l × h` projected data come to the
//! host, where [`symmetric_eigen`] solves them in f64. The basis (mean, components, variances)
//! is saved and loaded, so several captures can be drawn on the same axes.

use std::collections::HashMap;
use std::path::Path;

use model::burn::prelude::*;
use train::rng::SplitMix64;

use crate::linalg::symmetric_eigen;
use crate::store::{self, Stored, Values};
use crate::{AnalysisError, host_f32};

/// How to fit.
#[derive(Debug, Clone, PartialEq)]
pub struct PcaOptions {
    pub components: usize,
    /// Extra random directions in the range finder (10 is the usual choice).
    pub oversample: usize,
    /// Power iterations: each sharpens the separation of the top directions from the rest by the
    /// ratio of singular values; 4 is plenty for latent states.
    pub power_iterations: usize,
    /// Seeds the random directions and the subsample.
    pub seed: u64,
    /// Fit on this many rows drawn without replacement instead of all of them.
    pub subsample: Option<usize>,
}

impl Default for PcaOptions {
    fn default() -> Self {
        Self {
            components: 6,
            oversample: 10,
            power_iterations: 4,
            seed: 0,
            subsample: None,
        }
    }
}

/// A fitted basis.
#[derive(Debug, Clone, PartialEq)]
pub struct Pca {
    /// `[h]`: the mean the data was centred with.
    pub mean: Vec<f32>,
    /// `k` orthonormal rows of length `h`, by decreasing variance. Signs are fixed so that each
    /// component's largest-magnitude loading is positive (an SVD's signs are arbitrary; this
    /// makes fits comparable across runs and devices).
    pub components: Vec<Vec<f32>>,
    /// Variance of the data along each component (`σ² / (n − 1)`).
    pub explained_variance: Vec<f32>,
    /// Total variance of the data over all `h` directions, for explained ratios.
    pub total_variance: f32,
    /// Rows the fit used.
    pub samples: usize,
}

impl Pca {
    /// Fits `options.components` components to the rows of `data` (`[n, h]`).
    pub fn fit(data: Tensor<2>, options: &PcaOptions) -> Result<Self, AnalysisError> {
        let device = data.device();
        let [rows, width] = data.dims();
        let data = match options.subsample {
            Some(m) if m < rows => {
                let mut order: Vec<usize> = (0..rows).collect();
                SplitMix64(options.seed ^ 0x5EED_5A3B_1E00_0000).shuffle(&mut order);
                let mut keep: Vec<i64> = order[..m].iter().map(|&i| i as i64).collect();
                keep.sort_unstable();
                data.select(0, Tensor::<1, Int>::from_data(TensorData::new(keep, [m]), &device))
            }
            _ => data,
        };
        let n = data.dims()[0];
        let k = options.components;
        if k == 0 || k >= n || k > width {
            return Err(AnalysisError::Invalid(format!(
                "cannot fit {k} components to {n} rows of width {width} (need 1 ≤ k < rows, k ≤ width)"
            )));
        }
        let mean = data.clone().mean_dim(0);
        let x = data - mean.clone();
        let l = (k + options.oversample).min(n).min(width);
        let omega = gaussian(width, l, options.seed, &device);
        let mut q = orthonormalize(x.clone().matmul(omega))?;
        for _ in 0..options.power_iterations {
            let z = orthonormalize(x.clone().transpose().matmul(q))?;
            q = orthonormalize(x.clone().matmul(z))?;
        }
        // B = Qᵀ X holds X's top singular triplets: B Bᵀ = U Σ² Uᵀ, components = Σ⁻¹ Uᵀ B.
        let b = rows_f64(q.transpose().matmul(x.clone()));
        let eig = symmetric_eigen(&gram(&b));
        if eig.vectors.len() < k || eig.values[k - 1] <= 1e-10 * eig.values[0] {
            return Err(AnalysisError::Invalid(format!(
                "the data has fewer than {k} directions of non-zero variance"
            )));
        }
        let mut components = Vec::with_capacity(k);
        for u in &eig.vectors[..k] {
            let mut c: Vec<f64> = (0..width)
                .map(|j| u.iter().zip(&b).map(|(uj, row)| uj * row[j]).sum())
                .collect();
            let norm = c.iter().map(|v| v * v).sum::<f64>().sqrt();
            let peak = c
                .iter()
                .copied()
                .max_by(|a, b| a.abs().total_cmp(&b.abs()))
                .unwrap_or(0.0);
            let sign = if peak < 0.0 { -1.0 } else { 1.0 };
            c.iter_mut().for_each(|v| *v *= sign / norm);
            components.push(c.into_iter().map(|v| v as f32).collect());
        }
        let dof = (n - 1) as f64;
        let total = x.square().sum().into_scalar::<f32>() as f64 / dof;
        Ok(Self {
            mean: host_f32(mean),
            components,
            explained_variance: eig.values[..k].iter().map(|s2| (s2 / dof) as f32).collect(),
            total_variance: total as f32,
            samples: n,
        })
    }

    pub fn width(&self) -> usize {
        self.mean.len()
    }

    /// The fraction of the total variance along each component.
    pub fn explained_ratio(&self) -> Vec<f32> {
        self.explained_variance
            .iter()
            .map(|v| v / self.total_variance)
            .collect()
    }

    /// Coordinates of the rows of `data` (`[n, h]`, on any device) in this basis: `[n, k]`.
    pub fn project(&self, data: Tensor<2>) -> Result<Tensor<2>, AnalysisError> {
        let device = data.device();
        let [_, width] = data.dims();
        if width != self.width() {
            return Err(AnalysisError::Invalid(format!(
                "the basis has width {}, the data {width}",
                self.width()
            )));
        }
        let k = self.components.len();
        let mean: Tensor<2> =
            Tensor::<1>::from_data(TensorData::new(self.mean.clone(), [width]), &device).unsqueeze_dim(0);
        let flat: Vec<f32> = self.components.iter().flatten().copied().collect();
        let basis = Tensor::<2>::from_data(TensorData::new(flat, [k, width]), &device);
        Ok((data - mean).matmul(basis.transpose()))
    }

    /// Writes the basis to a safetensors file (`mean [h]`, `components [k, h]`,
    /// `explained_variance [k]`, `total_variance [1]`; the sample count in the metadata).
    pub fn save(&self, path: &Path) -> Result<(), AnalysisError> {
        let flat: Vec<f32> = self.components.iter().flatten().copied().collect();
        let k = self.components.len();
        store::write(
            path,
            &[
                ("mean", vec![self.width()], Values::F32(&self.mean)),
                ("components", vec![k, self.width()], Values::F32(&flat)),
                ("explained_variance", vec![k], Values::F32(&self.explained_variance)),
                ("total_variance", vec![1], Values::F32(&[self.total_variance])),
            ],
            HashMap::from([("samples".to_string(), self.samples.to_string())]),
        )
    }

    pub fn load(path: &Path) -> Result<Self, AnalysisError> {
        let stored = Stored::open(path)?;
        let (shape, flat) = stored.f32("components")?;
        let &[k, width] = shape.as_slice() else {
            return Err(AnalysisError::format(
                path,
                format!("components has shape {shape:?}, expected [k, h]"),
            ));
        };
        let samples = stored
            .metadata()?
            .get("samples")
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| AnalysisError::format(path, "no sample count in the metadata"))?;
        Ok(Self {
            mean: stored.f32_shaped("mean", &[width])?,
            components: flat.chunks(width.max(1)).map(<[f32]>::to_vec).collect(),
            explained_variance: stored.f32_shaped("explained_variance", &[k])?,
            total_variance: stored.f32_shaped("total_variance", &[1])?[0],
            samples,
        })
    }
}

/// `[rows, cols]` standard normal draws from `seed` (Box-Muller on splitmix64), made on the
/// host so that every device gets the same directions.
fn gaussian(rows: usize, cols: usize, seed: u64, device: &Device) -> Tensor<2> {
    let mut rng = SplitMix64(seed);
    let mut uniform = move || ((rng.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    let values: Vec<f32> = (0..rows * cols)
        .map(|_| ((-2.0 * uniform().ln()).sqrt() * (std::f64::consts::TAU * uniform()).cos()) as f32)
        .collect();
    Tensor::from_data(TensorData::new(values, [rows, cols]), device)
}

/// An orthonormal basis `[m, l']` of the column space of `y` (`[m, l]`, `l' ≤ l`), by two
/// passes of `y ← y · V Λ^{-1/2}` with `YᵀY = V Λ Vᵀ` solved on the host. Directions whose
/// variance is below 1e-10 of the largest are dropped: in f32 they are rounding noise. The
/// first pass leaves columns orthogonal to about 1e-3, the second to rounding.
fn orthonormalize(mut y: Tensor<2>) -> Result<Tensor<2>, AnalysisError> {
    let device = y.device();
    for _pass in 0..2 {
        let eig = symmetric_eigen(&rows_f64(y.clone().transpose().matmul(y.clone())));
        let top = eig.values.first().copied().unwrap_or(0.0);
        if top <= 0.0 || !top.is_finite() {
            return Err(AnalysisError::Invalid(
                "the data has no variance (or is not finite)".to_string(),
            ));
        }
        let kept: Vec<usize> = (0..eig.values.len()).filter(|&j| eig.values[j] > 1e-10 * top).collect();
        let l = eig.values.len();
        let mut w = vec![0f32; l * kept.len()];
        for (c, &j) in kept.iter().enumerate() {
            let scale = 1.0 / eig.values[j].sqrt();
            for r in 0..l {
                w[r * kept.len() + c] = (eig.vectors[j][r] * scale) as f32;
            }
        }
        y = y.matmul(Tensor::from_data(TensorData::new(w, [l, kept.len()]), &device));
    }
    Ok(y)
}

/// A small device matrix as host rows in f64.
fn rows_f64(t: Tensor<2>) -> Vec<Vec<f64>> {
    let [_, cols] = t.dims();
    host_f32(t)
        .chunks(cols.max(1))
        .map(|r| r.iter().map(|&v| v as f64).collect())
        .collect()
}

/// `B Bᵀ` of host rows.
fn gram(b: &[Vec<f64>]) -> Vec<Vec<f64>> {
    b.iter()
        .map(|x| b.iter().map(|y| x.iter().zip(y).map(|(p, q)| p * q).sum()).collect())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use nalgebra::DMatrix;

    fn normal(rng: &mut SplitMix64) -> f64 {
        let mut u = || ((rng.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        (-2.0 * u().ln()).sqrt() * (std::f64::consts::TAU * u()).cos()
    }

    /// `n × h` rows: an offset mean, `scales.len()` random directions with those standard
    /// deviations, and isotropic noise.
    fn planted(n: usize, h: usize, scales: &[f64], noise: f64, seed: u64) -> Vec<f32> {
        let mut rng = SplitMix64(seed);
        let mean: Vec<f64> = (0..h).map(|_| 3.0 * normal(&mut rng)).collect();
        let dirs: Vec<Vec<f64>> = scales
            .iter()
            .map(|_| {
                let d: Vec<f64> = (0..h).map(|_| normal(&mut rng)).collect();
                let norm = d.iter().map(|x| x * x).sum::<f64>().sqrt();
                d.into_iter().map(|x| x / norm).collect()
            })
            .collect();
        let mut rows = Vec::with_capacity(n * h);
        for _ in 0..n {
            let z: Vec<f64> = scales.iter().map(|s| s * normal(&mut rng)).collect();
            for j in 0..h {
                let signal: f64 = z.iter().zip(&dirs).map(|(z, d)| z * d[j]).sum();
                rows.push((mean[j] + signal + noise * normal(&mut rng)) as f32);
            }
        }
        rows
    }

    /// The exact decomposition: variances (descending) and sign-normalised components.
    fn exact(rows: &[f32], n: usize, h: usize) -> (Vec<f64>, Vec<Vec<f64>>, f64) {
        let x = DMatrix::from_row_iterator(n, h, rows.iter().map(|&v| v as f64));
        let mean = x.row_mean();
        let centred = DMatrix::from_fn(n, h, |i, j| x[(i, j)] - mean[j]);
        let total = centred.iter().map(|v| v * v).sum::<f64>() / (n - 1) as f64;
        let svd = centred.svd(false, true);
        let v_t = svd.v_t.unwrap();
        let mut order: Vec<usize> = (0..svd.singular_values.len()).collect();
        order.sort_by(|&a, &b| svd.singular_values[b].total_cmp(&svd.singular_values[a]));
        let variances = order
            .iter()
            .map(|&i| svd.singular_values[i].powi(2) / (n - 1) as f64)
            .collect();
        let components = order
            .iter()
            .map(|&i| {
                let c: Vec<f64> = v_t.row(i).iter().copied().collect();
                let peak = c.iter().copied().max_by(|a, b| a.abs().total_cmp(&b.abs())).unwrap();
                c.into_iter().map(|v| v * peak.signum()).collect()
            })
            .collect();
        (variances, components, total)
    }

    fn tensor(rows: &[f32], n: usize, h: usize) -> Tensor<2> {
        Tensor::from_data(TensorData::new(rows.to_vec(), [n, h]), &Device::flex())
    }

    fn check_against_exact(n: usize, h: usize, scales: &[f64], noise: f64) {
        let rows = planted(n, h, scales, noise, 42);
        let pca = Pca::fit(tensor(&rows, n, h), &PcaOptions::default()).unwrap();
        let (variances, components, total) = exact(&rows, n, h);
        assert_eq!((pca.samples, pca.width(), pca.components.len()), (n, h, 6));
        assert!((pca.total_variance as f64 - total).abs() < 1e-4 * total);
        for j in 0..6 {
            let rel = (pca.explained_variance[j] as f64 - variances[j]).abs() / variances[j];
            assert!(
                rel < 1e-3,
                "variance {j}: {} vs {}",
                pca.explained_variance[j],
                variances[j]
            );
            let worst = pca.components[j]
                .iter()
                .zip(&components[j])
                .map(|(a, b)| (*a as f64 - b).abs())
                .fold(0.0, f64::max);
            assert!(worst < 2e-3, "component {j} differs by {worst}");
            for i in 0..6 {
                let dot: f64 = pca.components[i]
                    .iter()
                    .zip(&pca.components[j])
                    .map(|(a, b)| (a * b) as f64)
                    .sum();
                assert!((dot - f64::from(u8::from(i == j))).abs() < 1e-5, "orthonormal");
            }
        }
        let ratio: f32 = pca.explained_ratio().iter().sum();
        assert!(ratio > 0.9 && ratio <= 1.0 + 1e-5);
    }

    #[test]
    fn matches_an_exact_decomposition_on_planted_low_rank_data() {
        check_against_exact(400, 48, &[20.0, 12.0, 8.0, 5.0, 3.0, 2.0], 0.05);
        // Wider than tall, and a weak last direction close to the noise.
        check_against_exact(150, 300, &[9.0, 7.0, 5.0, 4.0, 3.0, 1.0, 0.5], 0.02);
    }

    #[test]
    fn subsamples_projects_and_round_trips_through_a_file() {
        let (n, h) = (500, 32);
        let rows = planted(n, h, &[10.0, 6.0, 4.0, 3.0, 2.0, 1.5], 0.05, 7);
        let options = PcaOptions {
            subsample: Some(300),
            ..PcaOptions::default()
        };
        let pca = Pca::fit(tensor(&rows, n, h), &options).unwrap();
        assert_eq!(pca.samples, 300);
        let (_, components, _) = exact(&rows, n, h);
        for (j, (ours, exact)) in pca.components.iter().zip(&components).enumerate() {
            let dot: f64 = ours.iter().zip(exact).map(|(a, b)| *a as f64 * b).sum();
            assert!(dot > 0.99, "component {j}: cos {dot}");
        }
        let coords = host_f32(pca.project(tensor(&rows[..2 * h], 2, h)).unwrap());
        for r in 0..2 {
            for j in 0..6 {
                let want: f32 = (0..h)
                    .map(|c| (rows[r * h + c] - pca.mean[c]) * pca.components[j][c])
                    .sum();
                assert!((coords[r * 6 + j] - want).abs() < 1e-3);
            }
        }
        let scratch = tempfile::tempdir().unwrap();
        let dir = scratch.path();
        let path = dir.join("basis.safetensors");
        pca.save(&path).unwrap();
        assert_eq!(Pca::load(&path).unwrap(), pca);
    }

    #[test]
    fn refuses_what_it_cannot_fit() {
        let rows = planted(50, 8, &[3.0, 2.0, 1.0], 0.0, 1);
        let fit = |rows: &[f32], n, k| {
            let options = PcaOptions {
                components: k,
                ..PcaOptions::default()
            };
            Pca::fit(tensor(rows, n, 8), &options)
        };
        assert!(matches!(fit(&rows, 50, 0), Err(AnalysisError::Invalid(_))));
        assert!(matches!(fit(&rows, 50, 9), Err(AnalysisError::Invalid(_))));
        assert!(matches!(fit(&rows[..5 * 8], 5, 5), Err(AnalysisError::Invalid(_))));
        // Rank 3 without noise: no six directions of variance.
        let err = fit(&rows, 50, 6).unwrap_err().to_string();
        assert!(err.contains("fewer than 6 directions"), "{err}");
        // Constant rows: no variance at all.
        let err = fit(&[1.0; 50 * 8], 50, 2).unwrap_err().to_string();
        assert!(err.contains("no variance"), "{err}");
        let pca = fit(&rows, 50, 2).unwrap();
        assert!(matches!(
            pca.project(tensor(&rows[..4 * 4], 4, 4)),
            Err(AnalysisError::Invalid(_))
        ));
    }
}
