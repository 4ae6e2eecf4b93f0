//! The wavefront sampler against the authors' code beyond the shipped fixtures: every knob's
//! runs, recorded with the reference on tiny-d's model (tests/data/diffusion-tiny-d.json, made
//! by scripts/diffusion-reference-runs.py), must come out token for token, with the same core
//! steps between samplings and the same sampled logits.

use std::path::Path;

use infer::fixture_report::check_runs;
use model::burn::prelude::Device;
use model::fixture::Fixture;

#[test]
fn every_knob_reproduces_the_reference() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let fixture = Fixture::open(root.join("fixtures/reference/tiny-d"), &Device::flex()).unwrap();
    let (checks, unsupported) = check_runs(&fixture, &root.join("infer/tests/data/diffusion-tiny-d.json")).unwrap();
    assert!(unsupported.is_empty(), "not reproduced: {unsupported:?}");
    let failed: Vec<String> = checks.iter().filter(|c| !c.passed).map(|c| c.to_string()).collect();
    assert!(failed.is_empty(), "{}", failed.join("\n"));
    // Thirteen settings, each with tokens and steps (and sampled values when robust).
    assert!(checks.len() >= 13 * 2, "{} checks", checks.len());
}
