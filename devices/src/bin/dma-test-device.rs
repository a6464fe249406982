//! `dma-test-device --socket PATH [--dirty-log on|off|empty]`: the project's DMA test device
//! as a vfio-user server. It serves one VMM and exits when that VMM disconnects.
//! `--dirty-log off` makes it a device without dirty tracking, `empty` one that claims to
//! track and reports nothing (both for tests of what the VMM does with such devices).

use std::path::PathBuf;
use std::process::ExitCode;

use devices::testdev::DirtyLogMode;

const USAGE: &str = "usage: dma-test-device --socket PATH [--dirty-log on|off|empty]";

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mut socket = None;
    let mut dirty_log = DirtyLogMode::On;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--socket" => socket = args.next().map(PathBuf::from),
            "--dirty-log" => match args.next().as_deref().map(str::parse) {
                Some(Ok(m)) => dirty_log = m,
                Some(Err(e)) => {
                    eprintln!("dma-test-device: --dirty-log {e}");
                    return ExitCode::from(2);
                }
                None => {
                    eprintln!("dma-test-device: --dirty-log needs a value ({USAGE})");
                    return ExitCode::from(2);
                }
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
    match devices::testdev::serve(&socket, dirty_log) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dma-test-device: {}: {e}", socket.display());
            let _ = std::fs::remove_file(&socket);
            ExitCode::FAILURE
        }
    }
}
