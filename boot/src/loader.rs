//! Loading a Linux kernel (uncompressed ELF `vmlinux`, or `bzImage`) and its initramfs, and
//! filling the zero page (`struct boot_params`) of the x86 64-bit boot protocol
//! (`Documentation/arch/x86/boot.rst`).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::Elf;
use linux_loader::loader::{self, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::layout::*;
use crate::BootError;

/// `e820` type of usable RAM.
pub const E820_RAM: u32 = 1;
/// `e820` type of reserved memory.
pub const E820_RESERVED: u32 = 2;

/// Magic of a bzImage setup header (`"HdrS"`, at file offset 0x202).
const BZIMAGE_MAGIC: u32 = 0x5372_6448;
/// Offset of the 64-bit entry point from the start of a bzImage's protected-mode kernel.
const BZIMAGE_ENTRY_64_OFFSET: u64 = 0x200;
/// Largest GPA an initramfs may end at when the kernel gives no `initrd_addr_max`.
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x7fff_ffff;

/// Which format a kernel image was in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// Uncompressed ELF (`vmlinux`, or any static ELF entered in long mode).
    Elf,
    /// A `bzImage`, entered at its 64-bit entry point.
    BzImage,
}

/// Where a kernel landed in guest memory.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// Image format.
    pub format: KernelFormat,
    /// GPA of the 64-bit entry point.
    pub entry: GuestAddress,
    /// First GPA after the loaded image.
    pub end: u64,
    /// The bzImage setup header, if any.
    pub setup_header: Option<setup_header>,
}

/// Where the initramfs landed: `(GPA, size in bytes)`.
#[derive(Debug, Clone, Copy)]
pub struct LoadedInitramfs {
    /// GPA of the first byte.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
}

fn detect_format(file: &mut File, path: &Path) -> Result<KernelFormat, BootError> {
    let mut magic = [0u8; 4];
    let unknown = || BootError::UnknownKernelFormat(path.to_path_buf());
    file.read_exact(&mut magic).map_err(|_| unknown())?;
    if magic == [0x7f, b'E', b'L', b'F'] {
        return Ok(KernelFormat::Elf);
    }
    file.seek(SeekFrom::Start(0x202)).map_err(|_| unknown())?;
    file.read_exact(&mut magic).map_err(|_| unknown())?;
    if u32::from_le_bytes(magic) == BZIMAGE_MAGIC {
        return Ok(KernelFormat::BzImage);
    }
    Err(unknown())
}

/// Loads the kernel at `path` into `mem`, whose RAM is `mem_size` bytes.
///
/// # Errors
/// [`BootError::OpenKernel`] when the file cannot be read, [`BootError::UnknownKernelFormat`]
/// when it is neither ELF nor bzImage, [`BootError::KernelTooBig`] when it does not fit in
/// RAM, [`BootError::LoadKernel`] for a malformed image.
pub fn load_kernel<M: GuestMemoryBackend>(
    mem: &M,
    mem_size: u64,
    path: &Path,
) -> Result<LoadedKernel, BootError> {
    let open_err = |source| BootError::OpenKernel {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(open_err)?;
    if file.metadata().map_err(open_err)?.is_dir() {
        return Err(open_err(std::io::Error::from_raw_os_error(libc::EISDIR)));
    }
    let format = detect_format(&mut file, path)?;
    let too_big = || BootError::KernelTooBig {
        path: path.to_path_buf(),
        mem_size,
    };
    let result = match format {
        KernelFormat::Elf => Elf::load(mem, None, &mut file, Some(GuestAddress(HIGH_RAM_START))),
        KernelFormat::BzImage => {
            BzImage::load(mem, None, &mut file, Some(GuestAddress(HIGH_RAM_START)))
        }
    }
    .map_err(|e| match e {
        loader::Error::Elf(loader::elf::Error::ReadKernelImage)
        | loader::Error::Bzimage(loader::bzimage::Error::ReadBzImageCompressedKernel)
        | loader::Error::MemoryOverflow => too_big(),
        other => BootError::LoadKernel {
            path: path.to_path_buf(),
            source: other,
        },
    })?;
    // The loader stops at the file size; the image also needs its bss and some room to run.
    if result.kernel_end > ram_end(mem_size).min(MMIO_32_START) {
        return Err(too_big());
    }
    let entry = match format {
        KernelFormat::Elf => result.kernel_load,
        KernelFormat::BzImage => GuestAddress(result.kernel_load.0 + BZIMAGE_ENTRY_64_OFFSET),
    };
    Ok(LoadedKernel {
        format,
        entry,
        end: result.kernel_end,
        setup_header: result.setup_header,
    })
}

/// Loads the initramfs at `path` as high as it can go below 3 GiB, the end of RAM and the
/// kernel's `initrd_addr_max`, and above the kernel.
///
/// # Errors
/// [`BootError::OpenInitramfs`] when unreadable, [`BootError::InitramfsTooBig`] when it does
/// not fit.
pub fn load_initramfs<M: GuestMemoryBackend>(
    mem: &M,
    mem_size: u64,
    kernel: &LoadedKernel,
    path: &Path,
) -> Result<LoadedInitramfs, BootError> {
    let open_err = |source| BootError::OpenInitramfs {
        path: path.to_path_buf(),
        source,
    };
    let data = std::fs::read(path).map_err(open_err)?;
    let size = data.len() as u64;
    let addr_max = kernel
        .setup_header
        .map(|h| u64::from(h.initrd_addr_max))
        .filter(|&m| m != 0)
        .unwrap_or(DEFAULT_INITRD_ADDR_MAX);
    let top = ram_end(mem_size).min(MMIO_32_START).min(addr_max + 1);
    let too_big = || BootError::InitramfsTooBig {
        path: path.to_path_buf(),
        size,
        mem_size,
    };
    let addr = top.checked_sub(size).ok_or_else(too_big)? & !0xfff;
    if addr < kernel.end {
        return Err(too_big());
    }
    mem.write_slice(&data, GuestAddress(addr))
        .map_err(|_| too_big())?;
    Ok(LoadedInitramfs { addr, size })
}

/// The e820 map handed to the guest: RAM, the legacy hole and the ECAM area reserved.
pub fn e820_entries(mem_size: u64) -> Vec<boot_e820_entry> {
    let entry = |addr: u64, size: u64, type_: u32| boot_e820_entry {
        addr,
        size,
        r#type: type_,
    };
    let mut v = vec![
        entry(0, EBDA_START, E820_RAM),
        entry(EBDA_START, HIGH_RAM_START - EBDA_START, E820_RESERVED),
    ];
    for (start, size) in ram_ranges(mem_size) {
        let end = start + size;
        let start = start.max(HIGH_RAM_START);
        if end > start {
            v.push(entry(start, end - start, E820_RAM));
        }
    }
    v.push(entry(PCI_ECAM_START, PCI_ECAM_SIZE, E820_RESERVED));
    v
}

/// Writes `cmdline` at [`CMDLINE_START`] and the zero page at [`ZERO_PAGE_START`].
///
/// `rsdp` is the GPA of the ACPI RSDP, if ACPI tables were written.
///
/// # Errors
/// [`BootError::Cmdline`] or [`BootError::WriteBootData`].
pub fn write_boot_params<M: GuestMemoryBackend>(
    mem: &M,
    mem_size: u64,
    kernel: &LoadedKernel,
    initramfs: Option<&LoadedInitramfs>,
    cmdline: &Cmdline,
    rsdp: Option<u64>,
) -> Result<(), BootError> {
    loader::load_cmdline(mem, GuestAddress(CMDLINE_START), cmdline).map_err(BootError::Cmdline)?;
    let cmdline_len = cmdline
        .as_cstring()
        .map(|c| c.as_bytes().len())
        .map_err(BootError::CmdlineBuild)?;

    let mut params = boot_params::default();
    if let Some(hdr) = kernel.setup_header {
        params.hdr = hdr;
    }
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = BZIMAGE_MAGIC;
    params.hdr.type_of_loader = 0xff;
    params.hdr.kernel_alignment = 0x0100_0000;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    params.hdr.loadflags |= linux_loader::bootparam::LOADED_HIGH;
    if let Some(initrd) = initramfs {
        params.hdr.ramdisk_image = initrd.addr as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
    }
    if let Some(rsdp) = rsdp {
        params.acpi_rsdp_addr = rsdp;
    }
    let entries = e820_entries(mem_size);
    for (slot, e) in params.e820_table.iter_mut().zip(entries.iter()) {
        *slot = *e;
    }
    params.e820_entries = entries.len() as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))
        .map_err(|_| BootError::WriteBootData("boot_params"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn write_temp(name: &str, data: &[u8]) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("boot-{}-{name}", std::process::id()));
        std::fs::write(&p, data).unwrap();
        p
    }

    /// A bzImage with one setup sector and 4 KiB of protected-mode kernel.
    fn fake_bzimage() -> Vec<u8> {
        let mut f = vec![0u8; 2 * 512 + 4096];
        f[0x1f1] = 1; // setup_sects
        f[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        f[0x202..0x206].copy_from_slice(&BZIMAGE_MAGIC.to_le_bytes());
        f[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes()); // protocol 2.15
        f[0x211] = 1; // loadflags: LOADED_HIGH
        f[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
        f[0x22c..0x230].copy_from_slice(&0x37ff_ffffu32.to_le_bytes()); // initrd_addr_max
        f
    }

    #[test]
    fn bzimage_is_entered_at_its_64_bit_entry() {
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let path = write_temp("bzimage", &fake_bzimage());
        let k = load_kernel(&mem, 64 << 20, &path).unwrap();
        assert_eq!(k.format, KernelFormat::BzImage);
        assert_eq!(k.entry, GuestAddress(0x10_0200));
        let initrd = write_temp("initrd", &[7u8; 5000]);
        let i = load_initramfs(&mem, 64 << 20, &k, &initrd).unwrap();
        assert_eq!(i.addr % 4096, 0);
        assert!(i.addr + i.size <= 64 << 20);
        std::fs::remove_file(path).unwrap();
        std::fs::remove_file(initrd).unwrap();
    }

    #[test]
    fn other_files_are_refused() {
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let path = write_temp(
            "text",
            b"hello, this is not a kernel at all, just some text",
        );
        assert!(matches!(
            load_kernel(&mem, 64 << 20, &path),
            Err(BootError::UnknownKernelFormat(_))
        ));
        let empty = write_temp("empty", b"");
        assert!(matches!(
            load_kernel(&mem, 64 << 20, &empty),
            Err(BootError::UnknownKernelFormat(_))
        ));
        std::fs::remove_file(path).unwrap();
        std::fs::remove_file(empty).unwrap();
    }

    #[test]
    fn e820_covers_ram_and_reserves_holes() {
        let e = e820_entries(256 << 20);
        let ram: u64 = e
            .iter()
            .filter(|e| e.r#type == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, (256 << 20) - (HIGH_RAM_START - EBDA_START));
        assert!(e
            .iter()
            .any(|e| e.r#type == E820_RESERVED && e.addr == PCI_ECAM_START));
        let e = e820_entries(5 << 30);
        assert!(e
            .iter()
            .any(|e| e.r#type == E820_RAM && e.addr == RAM_64_START && e.size == 2 << 30));
    }
}
