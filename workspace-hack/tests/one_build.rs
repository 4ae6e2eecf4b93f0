//! Every package selection reuses the workspace's build of Burn and its dependencies.
//!
//! Cargo compiles a crate again whenever its features, profile or any dependency's differ, so
//! `cargo build -p model` after `cargo build --workspace` can cost a second Burn (about 25
//! minutes on 2 cores). This test asks cargo for the units each selection would build
//! (`--unit-graph`, read-only: nothing is compiled) and checks that every unit of a registry
//! crate is one the workspace build has too, with and without the wgpu backend.
//!
//! `--unit-graph` is unstable; `RUSTC_BOOTSTRAP=1` lets the stable cargo print it. It is set
//! only for these queries, never for a build.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::process::Command;

use serde_json::Value;

const PACKAGES: [&str; 5] = ["model", "folder", "train", "infer", "analysis"];

/// The units `cargo <args>` would build, as one identity per unit that covers everything its
/// artifact depends on (package, target, features, profile, mode, platform, and the same for
/// every dependency), and the units' packages by identity.
fn units(args: &[&str]) -> HashMap<u64, (String, bool)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = Command::new(cargo)
        .args(args)
        .args(["-Z", "unstable-options", "--unit-graph"])
        .env("RUSTC_BOOTSTRAP", "1")
        .current_dir(root)
        .output()
        .expect("cargo runs");
    assert!(
        output.status.success(),
        "cargo {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    let graph: Value = serde_json::from_slice(&output.stdout).expect("a unit graph");
    let list = graph["units"].as_array().expect("units");
    let mut ids = vec![None; list.len()];
    (0..list.len())
        .map(|i| {
            let id = identity(list, i, &mut ids);
            let pkg = list[i]["pkg_id"].as_str().unwrap_or_default().to_string();
            let registry = pkg.starts_with("registry+");
            (id, (pkg, registry))
        })
        .collect()
}

fn identity(list: &[Value], i: usize, ids: &mut Vec<Option<u64>>) -> u64 {
    if let Some(id) = ids[i] {
        return id;
    }
    let unit = &list[i];
    let mut deps: Vec<(u64, String)> = unit["dependencies"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|d| {
            let index = d["index"].as_u64().expect("index") as usize;
            (identity(list, index, ids), d["extern_crate_name"].to_string())
        })
        .collect();
    deps.sort();
    let mut hasher = DefaultHasher::new();
    for key in ["pkg_id", "target", "features", "profile", "mode", "platform"] {
        unit[key].to_string().hash(&mut hasher);
    }
    deps.hash(&mut hasher);
    let id = hasher.finish();
    ids[i] = Some(id);
    id
}

/// Registry packages that `selection` would compile differently from the workspace build.
fn not_shared(workspace: &HashMap<u64, (String, bool)>, selection: &[&str]) -> BTreeSet<String> {
    units(selection)
        .into_iter()
        .filter(|(id, (_, registry))| *registry && !workspace.contains_key(id))
        .map(|(_, (pkg, _))| pkg.rsplit('#').next().unwrap_or(&pkg).to_string())
        .collect()
}

fn check(features: &[&str]) {
    let with = |args: &[&'static str]| -> Vec<&str> { [args, features].concat() };
    let mut workspace = units(&with(&["build", "--workspace", "--all-targets"]));
    workspace.extend(units(&with(&["test", "--workspace", "--no-run"])));
    let mut failures = Vec::new();
    for package in PACKAGES {
        for command in [&["build", "-p", package][..], &["test", "--no-run", "-p", package][..]] {
            let args = with(command);
            let extra = not_shared(&workspace, &args);
            if !extra.is_empty() {
                failures.push(format!(
                    "cargo {}: {}",
                    args.join(" "),
                    Vec::from_iter(extra).join(", ")
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "these selections would compile crates again (pin their features in workspace-hack):\n{}",
        failures.join("\n")
    );
}

#[test]
fn every_selection_shares_the_workspace_build_with_wgpu() {
    check(&["--features", "model/wgpu"]);
}

#[test]
fn every_selection_shares_the_workspace_build_without_wgpu() {
    check(&[]);
}
