//! Numerics against the authors' PyTorch reference: every forward-pass tensor of every fixture.

mod common;

use model::burn::prelude::Device;
use model::fixture::Fixture;

fn assert_forward(case: &str) {
    let fixture = Fixture::open(common::fixture_dir(case), &Device::flex()).unwrap();
    let checks = fixture.check_forward().unwrap();
    for check in &checks {
        println!("{case}: {check}");
    }
    assert!(checks.len() >= 18, "only {} checks", checks.len());
    let failed: Vec<_> = checks.iter().filter(|c| !c.passed).collect();
    assert!(failed.is_empty(), "{case}: failed {failed:#?}");
}

/// Truncated backprop: loss and every parameter's gradient for each recorded (n, k).
fn assert_train(case: &str, expected_checks: usize) {
    let fixture = Fixture::open(common::fixture_dir(case), &Device::flex()).unwrap();
    let checks = fixture.check_train().unwrap();
    let worst = checks
        .iter()
        .map(|c| c.max_abs_err / c.tolerance.max(1e-12))
        .fold(0.0, f64::max);
    println!(
        "{case}: {} train checks, worst error/tolerance {worst:.3}",
        checks.len()
    );
    assert_eq!(checks.len(), expected_checks);
    let failed: Vec<_> = checks.iter().filter(|c| !c.passed).collect();
    assert!(failed.is_empty(), "{case}: failed {failed:#?}");
}

#[test]
fn tiny_a_truncated_backprop_matches_reference() {
    assert_train("tiny-a", 80);
}

#[test]
fn tiny_c_truncated_backprop_matches_reference() {
    assert_train("tiny-c", 80);
}

#[test]
fn tiny_d_truncated_backprop_matches_reference() {
    assert_train("tiny-d", 152);
}

#[test]
fn tiny_a_forward_matches_reference() {
    assert_forward("tiny-a");
}

#[test]
fn tiny_c_forward_matches_reference() {
    assert_forward("tiny-c");
}

#[test]
fn tiny_d_forward_matches_reference() {
    assert_forward("tiny-d");
}

#[test]
fn every_shipped_fixture_is_covered_above() {
    let names: Vec<String> = common::fixture_cases()
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["tiny-a", "tiny-c", "tiny-d"]);
}
