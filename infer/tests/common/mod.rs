//! What the infer tests share: the fixture folder, a loopback hub, and running the `huginn`
//! binary.
#![allow(dead_code)] // each test file uses its own part

mod fixture;
pub mod hub_server;

use std::process::{Command, Output};

pub use fixture::*;

pub fn huginn(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_huginn")).args(args).output().unwrap()
}
