//! Snapshots and live migration.

pub mod kvm_state;
