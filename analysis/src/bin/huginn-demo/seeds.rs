//! `--seeds`: the demo once per seed, then each depth's accuracy as its mean, lowest and highest
//! across the seeds, and in how many seeds depth paid off.
//!
//! Why: whether a run finds the iterative solution is chance (docs/results.md: of seeds 0-5,
//! some settle on a one-pass solution and never gain from depth), so one chosen run says little
//! on its own. Every seed's demo is kept whole in `OUT/seed-N`; the spread is computed from the
//! `report.json` each wrote, read back and checked, into `OUT/seeds.json`, a band plot and
//! `OUT/index.html`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use analysis::plot::depth::{Band, Colours, plot_depth_bands};
use anyhow::{Context, Result, bail, ensure};
use serde::Deserialize;
use serde_json::json;

/// At most this many seeds in one run: each trains two models (about two minutes on two cores).
pub const MAX_SEEDS: usize = 100;

/// Parses a seed list: numbers and inclusive ranges, comma-separated (`0..5` and `0-5` are
/// both the six seeds 0 to 5; `0,2,7..9`). Duplicates count once; order is kept.
pub fn parse_seeds(text: &str) -> Result<Vec<u64>, String> {
    let number = |s: &str| {
        s.trim()
            .parse::<u64>()
            .map_err(|_| format!("`{s}` is not a seed (a whole number from 0 to {})", u64::MAX))
    };
    let mut seeds = Vec::new();
    for item in text.split(',') {
        let range = item.split_once("..").or_else(|| item.split_once('-'));
        let (first, last) = match range {
            Some((a, b)) => (number(a)?, number(b.trim_start_matches('='))?),
            None => (number(item)?, number(item)?),
        };
        if last < first {
            return Err(format!("`{item}` runs backwards; write {last}..{first}"));
        }
        if last - first >= MAX_SEEDS as u64 {
            return Err(format!("at most {MAX_SEEDS} seeds (each trains two models)"));
        }
        for seed in first..=last {
            if !seeds.contains(&seed) {
                seeds.push(seed);
            }
        }
    }
    if seeds.len() > MAX_SEEDS {
        return Err(format!("at most {MAX_SEEDS} seeds (each trains two models)"));
    }
    if seeds.len() < 2 {
        return Err("a spread needs two seeds or more (use --seed for one run)".into());
    }
    Ok(seeds)
}

/// Where seed `seed`'s demo goes.
pub fn seed_dir(out: &Path, seed: u64) -> PathBuf {
    out.join(format!("seed-{seed}"))
}

/// Accuracy by depth in the two splits, as `report.json` writes it.
#[derive(Debug, Clone, Deserialize)]
struct Splits<T> {
    in_distribution: T,
    harder: T,
}

type ByDepth = BTreeMap<String, f64>;

#[derive(Debug, Deserialize)]
struct ExitSummary {
    criterion: String,
    threshold: f64,
    accuracy: f64,
    mean_steps: f64,
}

/// The part of one seed's `report.json` the spread needs.
#[derive(Debug, Deserialize)]
struct SeedReport {
    accuracy_by_depth: Splits<ByDepth>,
    baseline_accuracy_by_depth: Splits<ByDepth>,
    questions: Splits<usize>,
    adaptive_exit: ExitSummary,
}

/// One seed's curves, checked: the same depths everywhere, accuracies in [0, 1].
#[derive(Debug, Clone, PartialEq)]
pub struct SeedCurves {
    pub seed: u64,
    pub depths: Vec<usize>,
    /// Recurrent in distribution, recurrent harder, baseline in distribution, baseline harder.
    pub curves: [Vec<f64>; 4],
    pub questions: [usize; 2],
    /// The report's headline exit rule: name, accuracy, mean steps per answer.
    pub exit: (String, f64, f64),
}

/// The four curves' names, in [`SeedCurves::curves`]' order.
const CURVES: [&str; 4] = [
    "recurrent_in_distribution",
    "recurrent_harder",
    "baseline_in_distribution",
    "baseline_harder",
];

impl SeedCurves {
    /// Reads and checks `dir/report.json`.
    pub fn read(seed: u64, dir: &Path) -> Result<Self> {
        let path = dir.join("report.json");
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let report: SeedReport =
            serde_json::from_str(&text).with_context(|| format!("{} is not a demo report", path.display()))?;
        Self::check(seed, report).with_context(|| format!("{}", path.display()))
    }

    fn check(seed: u64, report: SeedReport) -> Result<Self> {
        let parse = |map: &ByDepth| -> Result<Vec<(usize, f64)>> {
            let mut points = map
                .iter()
                .map(|(d, a)| {
                    let depth: usize = d
                        .parse()
                        .ok()
                        .filter(|d| *d >= 1)
                        .with_context(|| format!("depth `{d}`"))?;
                    ensure!((0.0..=1.0).contains(a), "accuracy {a} at depth {d} is not in [0, 1]");
                    Ok((depth, *a))
                })
                .collect::<Result<Vec<_>>>()?;
            points.sort_by_key(|p| p.0);
            Ok(points)
        };
        let maps = [
            &report.accuracy_by_depth.in_distribution,
            &report.accuracy_by_depth.harder,
            &report.baseline_accuracy_by_depth.in_distribution,
            &report.baseline_accuracy_by_depth.harder,
        ];
        let points = maps.map(parse);
        let mut curves: [Vec<f64>; 4] = Default::default();
        let mut depths: Option<Vec<usize>> = None;
        for (i, p) in points.into_iter().enumerate() {
            let p = p.with_context(|| CURVES[i])?;
            let these: Vec<usize> = p.iter().map(|(d, _)| *d).collect();
            ensure!(!these.is_empty(), "{} has no depths", CURVES[i]);
            match &depths {
                Some(d) => ensure!(*d == these, "{} is measured at other depths", CURVES[i]),
                None => depths = Some(these),
            }
            curves[i] = p.into_iter().map(|(_, a)| a).collect();
        }
        let questions = [report.questions.in_distribution, report.questions.harder];
        ensure!(questions.iter().all(|n| *n > 0), "no questions behind the accuracies");
        let e = report.adaptive_exit;
        ensure!(
            (0.0..=1.0).contains(&e.accuracy) && e.mean_steps.is_finite() && e.mean_steps >= 0.0,
            "the adaptive exit's accuracy or steps are out of range"
        );
        Ok(Self {
            seed,
            depths: depths.unwrap_or_default(),
            curves,
            questions,
            exit: (format!("{} < {}", e.criterion, e.threshold), e.accuracy, e.mean_steps),
        })
    }

    /// Whether depth paid off in this seed, in distribution: the best accuracy at any depth
    /// beats one pass of the same model (`over_one_pass`), and beats the non-recurrent
    /// baseline at its best depth (`over_baseline`), each by more than three standard errors of
    /// the difference (so a gain is not sampling noise of the questions asked).
    pub fn payoff(&self) -> Payoff {
        let n = self.questions[0] as f64;
        let best = |c: &[f64]| c.iter().copied().fold(0.0, f64::max);
        let deep = best(&self.curves[0]);
        let one_pass = self.curves[0][0];
        let baseline = best(&self.curves[2]);
        let clear = |a: f64, b: f64| {
            let se = ((a * (1.0 - a) + b * (1.0 - b)) / n).sqrt();
            a - b > 3.0 * se.max(0.5 / n)
        };
        Payoff {
            gain: deep - one_pass,
            over_one_pass: self.depths[0] == 1 && clear(deep, one_pass),
            over_baseline: clear(deep, baseline),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Payoff {
    /// Best accuracy at any depth minus accuracy at r = 1, in distribution.
    pub gain: f64,
    pub over_one_pass: bool,
    pub over_baseline: bool,
}

/// Mean, lowest and highest across seeds, per depth, for each curve.
#[derive(Debug, Clone, PartialEq)]
pub struct Spread {
    pub depths: Vec<usize>,
    /// `[curve][depth] = (mean, min, max)`.
    pub curves: [Vec<(f64, f64, f64)>; 4],
}

pub fn spread(seeds: &[SeedCurves]) -> Result<Spread> {
    let Some(first) = seeds.first() else {
        bail!("no seeds to summarise");
    };
    for s in seeds {
        ensure!(
            s.depths == first.depths,
            "seed {} was measured at depths {:?}, seed {} at {:?}",
            s.seed,
            s.depths,
            first.seed,
            first.depths
        );
    }
    let curves = std::array::from_fn(|c| {
        (0..first.depths.len())
            .map(|d| {
                let values = seeds.iter().map(|s| s.curves[c][d]);
                let mean = values.clone().sum::<f64>() / seeds.len() as f64;
                let min = values.clone().fold(f64::INFINITY, f64::min);
                let max = values.fold(f64::NEG_INFINITY, f64::max);
                (mean, min, max)
            })
            .collect()
    });
    Ok(Spread {
        depths: first.depths.clone(),
        curves,
    })
}

/// Reads every seed's report, writes `seeds.json`, the band plot and `index.html` in `out`, and
/// prints the table.
pub fn summarise(out: &Path, seeds: &[u64], wall_seconds: f64) -> Result<()> {
    let runs = seeds
        .iter()
        .map(|&s| SeedCurves::read(s, &seed_dir(out, s)))
        .collect::<Result<Vec<_>>>()?;
    let spread = spread(&runs)?;
    let payoffs: Vec<Payoff> = runs.iter().map(SeedCurves::payoff).collect();
    let over_one_pass = payoffs.iter().filter(|p| p.over_one_pass).count();
    let over_baseline = payoffs.iter().filter(|p| p.over_baseline).count();

    let labels = [
        "recurrent, in distribution",
        "recurrent, harder",
        "non-recurrent baseline, in distribution",
        "non-recurrent baseline, harder",
    ];
    let series: Vec<(String, Vec<(usize, f64)>)> = labels
        .iter()
        .zip(&spread.curves)
        .map(|(l, c)| {
            let mean = spread.depths.iter().zip(c).map(|(d, m)| (*d, m.0)).collect();
            (format!("{l} (mean)"), mean)
        })
        .collect();
    let bands: Vec<Band> = spread
        .curves
        .iter()
        .map(|c| spread.depths.iter().zip(c).map(|(d, m)| (*d, m.1, m.2)).collect())
        .collect();
    let plot = out.join("plots").join("accuracy-by-depth-seeds");
    plot_depth_bands(
        &plot,
        &format!(
            "Accuracy against test-time recurrence, {} seeds (mean; band: lowest to highest)",
            runs.len()
        ),
        "accuracy",
        &series,
        &bands,
        Colours::Categorical,
    )?;

    let by_depth = |c: &Vec<(f64, f64, f64)>| -> BTreeMap<String, serde_json::Value> {
        spread
            .depths
            .iter()
            .zip(c)
            .map(|(d, (mean, min, max))| (d.to_string(), json!({"mean": mean, "min": min, "max": max})))
            .collect()
    };
    let per_seed: Vec<serde_json::Value> = runs
        .iter()
        .zip(&payoffs)
        .map(|(r, p)| {
            json!({
                "seed": r.seed,
                "dir": format!("seed-{}", r.seed),
                "recurrent_in_distribution": r.curves[0],
                "recurrent_harder": r.curves[1],
                "baseline_in_distribution": r.curves[2],
                "baseline_harder": r.curves[3],
                "adaptive_exit": {"rule": r.exit.0, "accuracy": r.exit.1, "mean_steps": r.exit.2},
                "gain_over_one_pass": p.gain,
                "depth_pays_off": p.over_one_pass,
                "beats_baseline": p.over_baseline,
            })
        })
        .collect();
    let summary = json!({
        "seeds": seeds,
        "depths": spread.depths,
        "accuracy_by_depth": CURVES.iter().zip(&spread.curves).map(|(n, c)| (n.to_string(), json!(by_depth(c)))).collect::<BTreeMap<_, _>>(),
        "questions": {"in_distribution": runs[0].questions[0], "harder": runs[0].questions[1]},
        "depth_pays_off": over_one_pass,
        "beats_baseline": over_baseline,
        "payoff_rule": "in distribution, the best accuracy at any depth exceeds r = 1 (depth_pays_off) or the \
                        baseline's best (beats_baseline) by more than 3 standard errors of the difference",
        "per_seed": per_seed,
        "plot": "plots/accuracy-by-depth-seeds.png",
        "wall_seconds": wall_seconds,
    });
    let path = out.join("seeds.json");
    let text = serde_json::to_string_pretty(&summary).expect("JSON values serialize");
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    write_index(out, &runs, &spread, &payoffs)?;

    println!("\naccuracy by test-time depth r across seeds {seeds:?}: mean (lowest-highest)");
    println!(
        "{:>4} {:>22} {:>22} {:>22} {:>22}",
        "r", "recurrent", "rec. harder", "baseline", "base. harder"
    );
    for (i, d) in spread.depths.iter().enumerate() {
        let cells: Vec<String> = spread.curves.iter().map(|c| cell(c[i])).collect();
        println!(
            "{d:>4} {:>22} {:>22} {:>22} {:>22}",
            cells[0], cells[1], cells[2], cells[3]
        );
    }
    println!(
        "depth pays off (beyond one pass, in distribution) in {over_one_pass} of {} seeds; beats the \
         non-recurrent baseline in {over_baseline} of {}",
        runs.len(),
        runs.len()
    );
    Ok(())
}

/// `mean (min-max)` in percent.
fn cell((mean, min, max): (f64, f64, f64)) -> String {
    format!("{:.1}% ({:.1}-{:.1})", 100.0 * mean, 100.0 * min, 100.0 * max)
}

fn write_index(out: &Path, runs: &[SeedCurves], spread: &Spread, payoffs: &[Payoff]) -> Result<()> {
    let mut html = String::from(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Recurrent depth across seeds</title><style>\
         body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}\
         table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}\
         img{max-width:100%;border:1px solid #eee}</style></head><body>\
         <h1>Recurrent depth across seeds</h1><p>Accuracy by test-time depth: mean (lowest-highest).</p>\
         <table><tr><th>r</th><th>recurrent, in distribution</th><th>recurrent, harder</th>\
         <th>baseline, in distribution</th><th>baseline, harder</th></tr>",
    );
    for (i, d) in spread.depths.iter().enumerate() {
        let _ = write!(html, "<tr><td>{d}</td>");
        for c in &spread.curves {
            let _ = write!(html, "<td>{}</td>", cell(c[i]));
        }
        html.push_str("</tr>");
    }
    html.push_str(
        "</table><img src=\"plots/accuracy-by-depth-seeds.png\" alt=\"accuracy against depth across seeds\">\
         <table><tr><th>seed</th><th>r = 1</th><th>best depth</th><th>gain</th><th>depth pays off</th>\
         <th>beats baseline</th><th>adaptive exit</th><th>demo</th></tr>",
    );
    for (r, p) in runs.iter().zip(payoffs) {
        let best = r.curves[0].iter().copied().fold(0.0, f64::max);
        let yes = |b: bool| if b { "yes" } else { "no" };
        let _ = write!(
            html,
            "<tr><td>{0}</td><td>{1:.1}%</td><td>{2:.1}%</td><td>{3:+.1}</td><td>{4}</td><td>{5}</td>\
             <td>{6}: {7:.1}% at {8:.1} steps</td><td><a href=\"seed-{0}/index.html\">seed-{0}</a></td></tr>",
            r.seed,
            100.0 * r.curves[0][0],
            100.0 * best,
            100.0 * p.gain,
            yes(p.over_one_pass),
            yes(p.over_baseline),
            r.exit.0.replace('<', "&lt;"),
            100.0 * r.exit.1,
            r.exit.2
        );
    }
    html.push_str("</table><p>All numbers: <a href=\"seeds.json\">seeds.json</a>.</p></body></html>");
    let path = out.join("index.html");
    std::fs::write(&path, html).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_lists_are_inclusive_ranges_and_numbers() {
        assert_eq!(parse_seeds("0..5").unwrap(), vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(parse_seeds("0-2").unwrap(), vec![0, 1, 2]);
        assert_eq!(parse_seeds("0..=2").unwrap(), vec![0, 1, 2]);
        assert_eq!(parse_seeds("4, 1,7..8,1").unwrap(), vec![4, 1, 7, 8]);
        for (bad, says) in [
            ("3", "two seeds or more"),
            ("2..2", "two seeds or more"),
            ("5..1", "runs backwards"),
            ("0..100", "at most 100"),
            ("0..18446744073709551615", "at most 100"),
            ("a..3", "`a` is not a seed"),
            ("-1", "is not a seed"),
            ("", "is not a seed"),
        ] {
            let err = parse_seeds(bad).unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
        let many: Vec<String> = (0..101).map(|s| (s * 2).to_string()).collect();
        assert!(parse_seeds(&many.join(",")).unwrap_err().contains("at most 100"));
    }

    fn curves(seed: u64, recurrent: [f64; 3], baseline: [f64; 3]) -> SeedCurves {
        SeedCurves {
            seed,
            depths: vec![1, 4, 16],
            curves: [
                recurrent.to_vec(),
                recurrent.to_vec(),
                baseline.to_vec(),
                baseline.to_vec(),
            ],
            questions: [1000, 300],
            exit: ("kl < 0.001".into(), 0.9, 7.0),
        }
    }

    #[test]
    fn the_spread_is_each_depth_s_mean_lowest_and_highest() {
        let runs = [
            curves(0, [0.3, 0.7, 0.97], [0.8, 0.8, 0.8]),
            curves(1, [0.7, 0.72, 0.73], [0.8, 0.81, 0.8]),
            curves(2, [0.5, 0.9, 1.0], [0.6, 0.6, 0.6]),
        ];
        let s = spread(&runs).unwrap();
        assert_eq!(s.depths, vec![1, 4, 16]);
        let (mean, min, max) = s.curves[0][2];
        assert!((mean - (0.97 + 0.73 + 1.0) / 3.0).abs() < 1e-12);
        assert_eq!((min, max), (0.73, 1.0));
        assert_eq!(s.curves[2][1], ((0.8 + 0.81 + 0.6) / 3.0, 0.6, 0.81));

        let mut other = curves(3, [0.1, 0.2, 0.3], [0.1, 0.1, 0.1]);
        other.depths = vec![1, 4, 32];
        let err = spread(&[runs[0].clone(), other]).unwrap_err();
        assert!(err.to_string().contains("seed 3 was measured at depths"), "{err}");
        assert!(spread(&[]).is_err());
    }

    #[test]
    fn depth_pays_off_only_beyond_three_standard_errors() {
        // An iterative solution: far above one pass and the baseline.
        let iterative = curves(0, [0.3, 0.7, 0.97], [0.85, 0.85, 0.85]).payoff();
        assert!(iterative.over_one_pass && iterative.over_baseline);
        assert!((iterative.gain - 0.67).abs() < 1e-12);
        // A one-pass solution: 3 points over 1000 questions is about 1.5 standard errors.
        let one_pass = curves(1, [0.694, 0.72, 0.726], [0.84, 0.84, 0.84]).payoff();
        assert!(!one_pass.over_one_pass && !one_pass.over_baseline);
        // Gains from depth, still below the baseline.
        let short = curves(5, [0.70, 0.79, 0.794], [0.84, 0.84, 0.84]).payoff();
        assert!(short.over_one_pass && !short.over_baseline);
        // Perfect scores have no variance; an equal pair is still no gain.
        let flat = curves(6, [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]).payoff();
        assert!(!flat.over_one_pass && !flat.over_baseline);
    }

    #[test]
    fn a_report_with_an_accuracy_out_of_range_or_mismatched_depths_is_refused() {
        let report = |recurrent: &str, harder: &str| {
            format!(
                r#"{{"accuracy_by_depth": {{"in_distribution": {recurrent}, "harder": {harder}}},
                   "baseline_accuracy_by_depth": {{"in_distribution": {{"1": 0.5, "4": 0.5}}, "harder": {{"1": 0.4, "4": 0.4}}}},
                   "questions": {{"in_distribution": 1000, "harder": 300}},
                   "adaptive_exit": {{"criterion": "kl", "threshold": 0.001, "accuracy": 0.9, "mean_steps": 7.3}}}}"#
            )
        };
        let dir = tempfile::tempdir().unwrap();
        let write = |text: &str| std::fs::write(dir.path().join("report.json"), text).unwrap();
        write(&report(r#"{"4": 0.9, "1": 0.3}"#, r#"{"1": 0.1, "4": 0.5}"#));
        let ok = SeedCurves::read(7, dir.path()).unwrap();
        assert_eq!((ok.depths.clone(), ok.curves[0].clone()), (vec![1, 4], vec![0.3, 0.9]));
        for (recurrent, harder, says) in [
            (r#"{"1": 1.3, "4": 0.5}"#, r#"{"1": 0.1, "4": 0.5}"#, "not in [0, 1]"),
            (r#"{"1": 0.3, "8": 0.5}"#, r#"{"1": 0.1, "4": 0.5}"#, "other depths"),
            (r#"{"0": 0.3, "4": 0.5}"#, r#"{"0": 0.1, "4": 0.5}"#, "depth `0`"),
        ] {
            write(&report(recurrent, harder));
            let err = format!("{:#}", SeedCurves::read(7, dir.path()).unwrap_err());
            assert!(err.contains(says) && err.contains("report.json"), "{err}");
        }
        write("{\"accuracy_by_depth\": ");
        let err = format!("{:#}", SeedCurves::read(7, dir.path()).unwrap_err());
        assert!(err.contains("is not a demo report"), "{err}");
    }
}
