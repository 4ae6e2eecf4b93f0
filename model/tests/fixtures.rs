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
