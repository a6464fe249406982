//! Links the guest as a static, non-PIE ELF with no C runtime, at virtual 0xffffffff80200000
//! and physical 2 MiB (`link.ld`): the VMM loads it like a vmlinux and enters it in 64-bit
//! mode.

fn main() {
    let script = format!(
        "-Wl,-T,{}/link.ld",
        std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default()
    );
    println!("cargo:rustc-link-arg-bins={script}");
    for arg in [
        "-nostartfiles",
        "-nostdlib",
        "-static",
        "-no-pie",
        "-Wl,--build-id=none",
    ] {
        println!("cargo:rustc-link-arg-bins={arg}");
    }
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=link.ld");
}
