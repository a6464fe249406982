//! `dma-test-device --socket PATH`: the project's DMA test device as a vfio-user server.
//! It serves one VMM and exits when that VMM disconnects.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mut socket = None;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--socket" => socket = args.next().map(PathBuf::from),
            "--help" | "-h" => {
                println!("usage: dma-test-device --socket PATH");
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("dma-test-device: unknown argument `{other}` (usage: --socket PATH)");
                return ExitCode::from(2);
            }
        }
    }
    let Some(socket) = socket else {
        eprintln!("dma-test-device: --socket PATH is required");
        return ExitCode::from(2);
    };
    match devices::testdev::serve(&socket) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dma-test-device: {}: {e}", socket.display());
            let _ = std::fs::remove_file(&socket);
            ExitCode::FAILURE
        }
    }
}
