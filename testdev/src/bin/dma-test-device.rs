//! `dma-test-device --socket PATH [--dirty-log on|off|empty] [--flood-page-requests]
//! [--ignore-permissions] [--no-migration] [--truncate-ram] [--seccomp on|log|off]`: the
//! project's DMA test device as a vfio-user server. It serves one VMM and exits when that VMM
//! disconnects. Its threads run under seccomp filters (`--seccomp`, default on).
//! `--dirty-log off` makes it a device without dirty tracking, `empty` one that claims to
//! track and reports nothing (both for tests of what the VMM does with such devices);
//! `--flood-page-requests` one that asks for unmapped pages without end once the VMM turns
//! page requests on (for the throttling test); `--ignore-permissions` one that writes where its
//! mappings are read-only (for the isolation test of `dma=messages`); `--no-migration` one
//! that offers no migration; `--truncate-ram` one that tries to shrink the guest-RAM file it
//! is given.

use std::path::PathBuf;
use std::process::ExitCode;

use devices::seccomp::Mode;
use testdev::{Behaviour, DirtyLogMode};

const USAGE: &str = "usage: dma-test-device --socket PATH [--dirty-log on|off|empty] \
                     [--flood-page-requests] [--ignore-permissions] [--no-migration] \
                     [--truncate-ram] [--seccomp on|log|off]";

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mut socket = None;
    let mut dirty_log = DirtyLogMode::On;
    let mut seccomp = Mode::On;
    let mut flood = false;
    let mut ignore_permissions = false;
    let mut no_migration = false;
    let mut truncate_ram = false;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--flood-page-requests" => flood = true,
            "--ignore-permissions" => ignore_permissions = true,
            "--no-migration" => no_migration = true,
            "--truncate-ram" => truncate_ram = true,
            "--socket" => socket = args.next().map(PathBuf::from),
            "--dirty-log" => match value(&a, args.next()) {
                Ok(m) => dirty_log = m,
                Err(code) => return code,
            },
            "--seccomp" => match value(&a, args.next()) {
                Ok(m) => seccomp = m,
                Err(code) => return code,
            },
            "--help" | "-h" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("dma-test-device: unknown argument `{other}` ({USAGE})");
                return ExitCode::from(2);
            }
        }
    }
    let Some(socket) = socket else {
        eprintln!("dma-test-device: --socket PATH is required");
        return ExitCode::from(2);
    };
    devices::seccomp::set_mode(seccomp);
    let how = Behaviour {
        dirty_log,
        flood_page_requests: flood,
        ignore_permissions,
        no_migration,
        truncate_ram,
    };
    match testdev::serve(&socket, how) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dma-test-device: {}: {e}", socket.display());
            let _ = std::fs::remove_file(&socket);
            ExitCode::FAILURE
        }
    }
}

/// The value after `flag`, parsed; a missing or bad value is reported, naming the flag.
fn value<T: std::str::FromStr<Err = String>>(flag: &str, v: Option<String>) -> Result<T, ExitCode> {
    let Some(v) = v else {
        eprintln!("dma-test-device: {flag} needs a value ({USAGE})");
        return Err(ExitCode::from(2));
    };
    v.parse().map_err(|e| {
        eprintln!("dma-test-device: {flag} {e}");
        ExitCode::from(2)
    })
}
