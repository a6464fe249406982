//! The VMM as a library: everything the `vmm` binary is made of, so that fuzz targets and
//! benchmarks can drive its parts (the migration stream reader, above all) without a VM.
//!
//! The modules form a one-way spine (ARCHITECTURE.md; `tests::architecture` checks it):
//! `cli` → `config` → `build` → `machine` ← `migration` ← `api`, with `run` on top tying
//! the running machine to the API and migration. `error` is shared by all.

pub mod api;
pub mod build;
pub mod cli;
pub mod config;
pub mod error;
pub mod machine;
pub mod migration;
pub mod run;
