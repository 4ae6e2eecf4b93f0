//! The figures: each drawn into memory and to files, checked to decode and to show what it
//! should, from synthetic inputs whose numbers are known.

mod common;

use analysis::AnalysisError;
use analysis::curves::TrainingCurves;
use analysis::dynamics::{Motif, classify};
use analysis::plot::depth::{Colours, DepthFigure, plot_depth_bands, plot_depth_curves};
use analysis::plot::heatmap::{ConvergenceFigure, plot_convergence};
use analysis::plot::histogram::{ExitHistogram, plot_exit_histogram};
use analysis::plot::training::{TrainingFigure, plot_training_curves};
use analysis::plot::trajectories::{TokenTrajectory, TrajectoryFigure, iteration_colour, plot_trajectories};
use analysis::plot::{Figure, render};
use common::{assert_drawn, check_saved, contains_colour, svg_texts};
use train::metrics::Record;

fn trajectories() -> Vec<TokenTrajectory> {
    let steps = 48;
    let shape = |f: &dyn Fn(f32) -> [f32; 4]| -> Vec<Vec<f32>> { (0..=steps).map(|i| f(i as f32).to_vec()).collect() };
    let fixed = shape(&|i| {
        let r = 4.0 * 0.8f32.powf(i);
        [1.0 + r, 2.0 - r, r * 0.5, -r]
    });
    let orbit = shape(&|i| [(0.5 * i).cos(), (0.5 * i).sin(), 0.3 * (0.5 * i).cos(), 0.2]);
    let slider = shape(&|i| [0.1 * i, -0.05 * i, 1.0, 0.02 * i]);
    [("0 \"the\"", fixed), ("1 \"three\"", orbit), ("2 \"wrong\"", slider)]
        .into_iter()
        .map(|(label, points)| TokenTrajectory {
            label: label.to_string(),
            dynamics: Some(classify(&points)),
            points,
        })
        .collect()
}

#[test]
fn trajectory_grid_shows_paths_centres_and_motifs() {
    let tokens = trajectories();
    let motifs: Vec<Motif> = tokens.iter().map(|t| t.dynamics.unwrap().motif).collect();
    assert_eq!(motifs, [Motif::FixedPoint, Motif::Orbit, Motif::Slider]);
    let pairs = [(0, 1), (2, 3)];
    let figure = TrajectoryFigure {
        title: "Trajectories",
        tokens: &tokens,
        pairs: &pairs,
    };
    let pixels = render(&figure).unwrap();
    assert_drawn(&pixels, "trajectories");
    assert!(contains_colour(&pixels, (255, 0, 0)), "centre-of-mass markers");
    // Both ends of the iteration colour scale (viridis' first and last colours).
    assert!(contains_colour(&pixels, (68, 1, 84)) && contains_colour(&pixels, (254, 232, 37)));
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path();
    let base = dir.join("traj");
    let images = plot_trajectories(&base, "Trajectories", &tokens, &pairs).unwrap();
    assert!(images.png.ends_with("traj.png") && images.svg.ends_with("traj.svg"));
    let svg = check_saved(&base, figure.size());
    for text in [
        "Trajectories",
        "PC1",
        "PC4",
        "at position 0: fixed point",
        "at position 2: slider",
        "start (iteration 0)",
        "end (iteration 48)",
        "iteration (log scale)",
        "fixed point",
        "orbit",
        "slider",
        "centre of mass",
        "iteration",
    ] {
        assert!(svg.contains(text), "svg lacks {text:?}");
    }
    // Panel titles in words, the token's text quoted.
    assert!(
        svg.contains("token \"three\" at position 1") || svg.contains("token &quot;three&quot; at position 1"),
        "panel title in words"
    );
    // The colour bar's ticks at the iterations of the log scale.
    let texts = svg_texts(&svg);
    for tick in ["1", "2", "4", "8", "16", "32", "48"] {
        assert!(texts.iter().any(|t| t == tick), "no colour-bar tick {tick}: {texts:?}");
    }
    let err = plot_trajectories(&base, "t", &tokens, &[(0, 4)]).unwrap_err();
    assert!(matches!(err, AnalysisError::Invalid(_)), "{err}");
    assert!(plot_trajectories(&base, "t", &[], &pairs).is_err());
}

#[test]
fn trajectory_points_take_the_colours_of_their_iterations() {
    // A straight path at even speed, so that every iterate has its own place on the panel.
    let steps = 48;
    let points: Vec<Vec<f32>> = (0..=steps).map(|i| vec![i as f32, 0.5 * i as f32]).collect();
    let tokens = [TokenTrajectory {
        label: "0 #5".into(),
        points,
        dynamics: None,
    }];
    let figure = TrajectoryFigure {
        title: "One path",
        tokens: &tokens,
        pairs: &[(0, 1)],
    };
    let (width, height) = figure.size();
    let pixels = render(&figure).unwrap();
    // The left two thirds of a one-panel figure: the panel, not the colour bar at the right.
    let panel: Vec<(u8, u8, u8)> = (0..height as usize)
        .flat_map(|y| (0..(2 * width / 3) as usize).map(move |x| (y, x)))
        .map(|(y, x)| {
            let p = &pixels[(y * width as usize + x) * 3..][..3];
            (p[0], p[1], p[2])
        })
        .collect();
    let shown = |i: usize| {
        panel.contains(&{
            let c = iteration_colour(i, steps);
            (c.0, c.1, c.2)
        })
    };
    for i in [1, 2, 4, 8, 16, 32] {
        assert!(shown(i), "iteration {i}'s colour is not on the panel");
    }
    let distinct = (0..=steps)
        .map(|i| {
            let c = iteration_colour(i, steps);
            (c.0, c.1, c.2)
        })
        .collect::<std::collections::BTreeSet<_>>();
    let drawn = distinct.iter().filter(|c| panel.contains(c)).count();
    assert!(
        drawn >= 20,
        "only {drawn} of {} iteration colours drawn",
        distinct.len()
    );
}

#[test]
fn heat_map_colours_log_distances() {
    // Token 0 converges geometrically, token 1 oscillates, token 2 has converged exactly.
    let distances: Vec<Vec<f32>> = vec![
        (0..40).map(|i| 10.0 * 0.7f32.powi(i)).collect(),
        (0..40).map(|i| if i % 2 == 0 { 1.0 } else { 0.1 }).collect(),
        vec![0.0; 40],
    ];
    let labels: Vec<String> = ["a", "school", "c"].iter().map(|s| s.to_string()).collect();
    let figure = ConvergenceFigure {
        title: "Convergence",
        labels: &labels,
        distances: &distances,
    };
    // Zeros are off the log scale; the range spans at most eight decades below the top.
    let (lo, hi) = figure.log_range();
    assert!(
        (hi - 1.0).abs() < 1e-6 && (lo - (10.0 * 0.7f64.powi(39)).log10()).abs() < 1e-3,
        "{lo} {hi}"
    );
    let pixels = render(&figure).unwrap();
    assert_drawn(&pixels, "heat map");
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path();
    let base = dir.join("heat");
    plot_convergence(&base, "Convergence", &labels, &distances).unwrap();
    let svg = check_saved(&base, figure.size());
    for text in ["Convergence", "school", "iteration", "log₁₀"] {
        assert!(svg.contains(text), "svg lacks {text:?}");
    }
    assert!(plot_convergence(&base, "x", &labels[..2], &distances).is_err());
}

#[test]
fn exit_histograms_overlay_series_with_their_means() {
    let series = vec![
        ("KL < 5e-4".to_string(), vec![3, 3, 4, 10, 12, 12, 12]),
        ("latent diff < 0.03".to_string(), vec![20, 21, 25, 30]),
    ];
    let figure = ExitHistogram {
        title: "Steps to exit",
        unit: "tokens",
        series: &series,
    };
    assert_drawn(&render(&figure).unwrap(), "histogram");
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path();
    let base = dir.join("exits");
    plot_exit_histogram(&base, "Steps to exit", "tokens", &series).unwrap();
    let svg = check_saved(&base, figure.size());
    assert!(
        svg.contains("KL &lt; 5e-4 (mean 8.0)") || svg.contains("KL < 5e-4 (mean 8.0)"),
        "legend with mean"
    );
    assert!(svg.contains("(mean 24.0)"));
    assert!(plot_exit_histogram(&base, "x", "tokens", &[("empty".to_string(), vec![])]).is_err());
}

#[test]
fn depth_curves_use_a_log2_axis() {
    let series = vec![
        (
            "test".to_string(),
            vec![(1, 0.1), (2, 0.3), (4, 0.7), (8, 0.9), (16, 0.92)],
        ),
        ("harder".to_string(), vec![(1, 0.0), (4, 0.2), (16, 0.5), (32, 0.6)]),
    ];
    let figure = DepthFigure {
        title: "Accuracy by depth",
        y_label: "accuracy",
        series: &series,
        bands: &[],
        colours: Colours::Categorical,
    };
    assert_drawn(&render(&figure).unwrap(), "depth");
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path();
    let base = dir.join("depth");
    plot_depth_curves(&base, "Accuracy by depth", "accuracy", &series, Colours::Categorical).unwrap();
    let svg = check_saved(&base, figure.size());
    let texts = svg_texts(&svg);
    for tick in ["1", "2", "4", "8", "16", "32"] {
        assert!(texts.iter().any(|t| t == tick), "no tick {tick}: {texts:?}");
    }
    assert!(
        !texts.iter().any(|t| t == "3" || t == "6" || t == "12"),
        "ticks at powers of two only: {texts:?}"
    );
    assert!(svg.contains("harder") && svg.contains("log₂"));
    assert!(plot_depth_curves(&base, "x", "y", &[("zero".into(), vec![(0, 1.0)])], Colours::Ordered).is_err());
    assert!(!svg.contains("<polygon"), "no band was asked for");
}

#[test]
fn depth_bands_shade_each_curve_s_range_in_its_colour() {
    let series = vec![
        ("mean".to_string(), vec![(1, 0.5), (4, 0.7), (16, 0.8)]),
        ("other".to_string(), vec![(1, 0.6), (16, 0.65)]),
    ];
    let bands = vec![
        vec![(1, 0.3, 0.6), (4, 0.6, 0.9), (16, 0.7, 0.95)],
        vec![(1, 0.55, 0.62), (16, 0.6, 0.7)],
    ];
    let scratch = tempfile::tempdir().unwrap();
    let base = scratch.path().join("band");
    plot_depth_bands(&base, "Across seeds", "accuracy", &series, &bands, Colours::Categorical).unwrap();
    let svg = std::fs::read_to_string(base.with_extension("svg")).unwrap();
    assert_eq!(svg.matches("<polygon").count(), 2, "one band per curve");
    // The axis reaches the band's lowest edge (0.3), below every curve's point.
    let texts = svg_texts(&svg);
    assert!(texts.iter().any(|t| t == "0.3" || t == "0.30"), "{texts:?}");
    let one_band = &bands[..1];
    let err = plot_depth_bands(&base, "x", "y", &series, one_band, Colours::Categorical).unwrap_err();
    assert!(err.to_string().contains("1 bands for 2 curves"), "{err}");
    let at_zero = vec![vec![(0, 0.1, 0.2), (1, 0.1, 0.2)], vec![(1, 0.5, 0.6)]];
    assert!(plot_depth_bands(&base, "x", "y", &series, &at_zero, Colours::Categorical).is_err());
}

#[test]
fn training_curves_show_loss_and_accuracy_per_split() {
    let mut records = Vec::new();
    for step in 1..=20u64 {
        records.push(Record::Train {
            step,
            loss: 3.0 / step as f64,
            lr: 1e-3,
            grad_norm: 1.0,
            recurrence: 8,
            backprop: 4,
            tokens_per_second: 1e3,
            elapsed_seconds: step as f64,
        });
        if step % 5 == 0 {
            for depth in [1, 4, 16] {
                for split in ["test", "harder"] {
                    let hard = if split == "harder" { 2.0 } else { 1.0 };
                    records.push(Record::Eval {
                        step,
                        split: split.into(),
                        depth,
                        loss: hard * 4.0 / (step as f64 * depth as f64).sqrt(),
                        accuracy: Some((step as f64 * depth as f64 / 400.0).min(1.0) / hard),
                    });
                }
            }
        }
    }
    let curves = TrainingCurves::from_records(&records);
    let figure = TrainingFigure {
        title: "Training",
        curves: &curves,
    };
    assert_eq!(figure.size(), (1280, 844), "two splits × (loss, accuracy)");
    assert_drawn(&render(&figure).unwrap(), "training");
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path();
    let base = dir.join("training");
    plot_training_curves(&base, "Training", &curves).unwrap();
    let svg = check_saved(&base, figure.size());
    for text in [
        "loss (test split)",
        "loss (harder split)",
        "exact-match accuracy",
        "depth 16",
        "train",
    ] {
        assert!(svg.contains(text), "svg lacks {text:?}");
    }
    assert!(plot_training_curves(&base, "x", &TrainingCurves::default()).is_err());
}
