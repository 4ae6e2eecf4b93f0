//! Small dense linear algebra on the host, in f64: the symmetric eigenproblems left over once
//! the heavy products of PCA and the dynamics classifier ran on the device. The matrices are at
//! most a few dozen rows, so the cyclic Jacobi method (exact to rounding, no dependencies) is
//! the right tool.

/// Eigenvalues in decreasing order, and `vectors[j]`, the unit eigenvector of `values[j]`.
#[derive(Debug, Clone)]
pub struct SymmetricEigen {
    pub values: Vec<f64>,
    pub vectors: Vec<Vec<f64>>,
}

/// Eigen-decomposition of the symmetric matrix `matrix` (rows; only symmetry is assumed, not
/// checked) by cyclic Jacobi rotations until the off-diagonal part is negligible.
pub fn symmetric_eigen(matrix: &[Vec<f64>]) -> SymmetricEigen {
    let n = matrix.len();
    let mut a = matrix.to_vec();
    let mut v: Vec<Vec<f64>> = (0..n)
        .map(|i| (0..n).map(|j| f64::from(u8::from(i == j))).collect())
        .collect();
    let total: f64 = a.iter().flatten().map(|x| x * x).sum();
    for _sweep in 0..64 {
        let off: f64 = (0..n)
            .flat_map(|i| (0..n).filter(move |j| *j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i][j] * a[i][j])
            .sum();
        if off <= 1e-30 * total {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                if a[p][q] == 0.0 {
                    continue;
                }
                // The rotation that zeroes a[p][q] (Numerical Recipes' stable form).
                let theta = (a[q][q] - a[p][p]) / (2.0 * a[p][q]);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for row in a.iter_mut().chain(v.iter_mut()) {
                    let (x, y) = (row[p], row[q]);
                    row[p] = c * x - s * y;
                    row[q] = s * x + c * y;
                }
                let (upper, lower) = a.split_at_mut(q);
                for (x, y) in upper[p].iter_mut().zip(lower[0].iter_mut()) {
                    (*x, *y) = (c * *x - s * *y, s * *x + c * *y);
                }
            }
        }
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&i, &j| a[j][j].total_cmp(&a[i][i]));
    SymmetricEigen {
        values: order.iter().map(|&i| a[i][i]).collect(),
        vectors: order.iter().map(|&j| v.iter().map(|row| row[j]).collect()).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decomposes_a_symmetric_matrix() {
        // A fixed, indefinite 5×5 matrix with a repeated-looking spectrum.
        let n = 5;
        let m: Vec<Vec<f64>> = (0..n)
            .map(|i| {
                (0..n)
                    .map(|j| ((i * 7 + j * 7 + i * j) % 11) as f64 - 5.0 + if i == j { 2.0 } else { 0.0 })
                    .collect()
            })
            .collect();
        let eig = symmetric_eigen(&m);
        assert!(eig.values.windows(2).all(|w| w[0] >= w[1]));
        let trace: f64 = (0..n).map(|i| m[i][i]).sum();
        assert!((eig.values.iter().sum::<f64>() - trace).abs() < 1e-9);
        for (lambda, vector) in eig.values.iter().zip(&eig.vectors) {
            for i in 0..n {
                let mv: f64 = (0..n).map(|j| m[i][j] * vector[j]).sum();
                assert!((mv - lambda * vector[i]).abs() < 1e-9, "A v = λ v");
            }
        }
        for a in 0..n {
            for b in 0..n {
                let dot: f64 = (0..n).map(|i| eig.vectors[a][i] * eig.vectors[b][i]).sum();
                assert!((dot - f64::from(u8::from(a == b))).abs() < 1e-12, "orthonormal");
            }
        }
    }

    #[test]
    fn handles_diagonal_zero_and_empty_matrices() {
        let eig = symmetric_eigen(&[vec![1.0, 0.0], vec![0.0, 3.0]]);
        assert_eq!(eig.values, [3.0, 1.0]);
        assert_eq!(eig.vectors[0], [0.0, 1.0]);
        let eig = symmetric_eigen(&[vec![0.0; 3], vec![0.0; 3], vec![0.0; 3]]);
        assert_eq!(eig.values, [0.0; 3]);
        assert!(symmetric_eigen(&[]).values.is_empty());
    }
}
