//! `vmm`: boot a guest under KVM with an emulated virtio-iommu in front of passthrough
//! devices. See the README for the command line.

use vmm::{build, cli, error, run};

use std::process::ExitCode;

use clap::Parser;
use devices::exit::ExitReason;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    env_logger::Builder::new()
        .filter_level(cli.log_level)
        .format_target(false)
        .format_timestamp_millis()
        .init();

    warn_of_unbuilt_test_hooks();
    let config = cli.into_config();
    devices::seccomp::set_mode(config.seccomp);
    // Filtered from here on: set-up talks to device servers and back ends, and every thread
    // it starts inherits this list under its own.
    devices::seccomp::confine("set-up", devices::seccomp::lists::SETUP);
    #[cfg(feature = "test-hooks")]
    if std::env::var_os("VMM_TEST_SECCOMP").is_some_and(|v| v == "set-up") {
        // Test only: a system call outside the set-up list.
        // SAFETY: all-zero bytes are a valid `sysinfo` (integers only); the call writes
        // into it.
        let mut info: libc::sysinfo = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        unsafe { libc::sysinfo(&mut info) };
    }
    let result = build::Vm::new(&config).and_then(run::run);
    match result {
        Ok(summary) => {
            log::info!(
                "guest ended ({}) after {:.1} s; emulation fallbacks: {}",
                describe(&summary.reason),
                summary.wall.as_secs_f64(),
                summary.fallbacks
            );
            if config.counters {
                for line in &summary.counters {
                    eprintln!("counters: {line}");
                }
            }
            if let ExitReason::Error(msg) = &summary.reason {
                eprintln!("vmm: error: {msg}");
            }
            ExitCode::from(u8::try_from(summary.reason.exit_code()).unwrap_or(1))
        }
        Err(e) => {
            eprintln!("vmm: error: {}", error::one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The environment variables the process-level tests inject faults with; only a build with
/// the cargo feature `test-hooks` reads them.
const TEST_HOOKS: [&str; 4] = [
    "VMM_TEST_HANDOVER_FAULT",
    "VMM_TEST_SECCOMP",
    "VMM_TEST_VHOST_USER_LOG",
    "VMM_KVM_DEVICE",
];

/// Says which test hooks are set but ignored, in a build without them.
fn warn_of_unbuilt_test_hooks() {
    if cfg!(feature = "test-hooks") {
        return;
    }
    for var in TEST_HOOKS {
        if std::env::var_os(var).is_some() {
            log::warn!("{var} is ignored: this vmm was built without the cargo feature test-hooks");
        }
    }
}

fn describe(reason: &ExitReason) -> String {
    match reason {
        ExitReason::PowerOff => "power off".into(),
        ExitReason::Reset => "reset".into(),
        ExitReason::TestExit(c) => format!("test exit code {c}"),
        ExitReason::Error(e) => format!("error: {e}"),
        ExitReason::Stopped => "stopped".into(),
        ExitReason::Migrated(to) => format!("migrated to {to}"),
    }
}
