//! Fuzzes the vfio-user client's reply parsing: the input is everything a device server sends
//! (the version reply, device and region info, then the replies to region reads and writes,
//! DMA maps and unmaps, IRQ info and SET_IRQS, DEVICE_FEATURE and MIG_DATA_READ, and the
//! server's own DMA_READ/DMA_WRITE commands in between), whatever the client asked. The
//! client must refuse what is malformed with an error, never panic, and never read past a
//! message.
#![no_main]

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use devices::passthrough::message_dma::MessageDma;
use devices::passthrough::vfio_user::VfioUserClient;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok((client_end, mut server_end)) = UnixStream::pair() else {
        return;
    };
    // Everything the server will ever say, then end of stream.
    if server_end.write_all(data).is_err() {
        return;
    }
    let _ = server_end.shutdown(std::net::Shutdown::Write);
    let Ok(mut c) = VfioUserClient::from_stream(client_end, Duration::from_millis(50)) else {
        return;
    };
    let memfd = std::fs::File::open("/dev/null").unwrap();
    // The server's DMA_READ/DMA_WRITE go to a small table over 1 MiB of guest memory.
    if let Ok(mem) = devices::GuestMemoryMmap::from_ranges(&[(vm_memory::GuestAddress(0), 1 << 20)]) {
        let table = Arc::new(MessageDma::new(Arc::new(mem), None));
        let _ = table.map(0x10000, 0x1000, 0x4000, iommu::Perm::RW);
        c.set_dma_access(table);
    }
    let mut buf = [0u8; 64];
    for i in 0..c.regions().len().min(4) as u32 {
        let _ = c.region_read(i, 0, &mut buf);
        let _ = c.region_write(i, 8, &buf[..4]);
    }
    let _ = c.irq_info(0);
    let _ = c.set_irqs(0, 0, &[]);
    let _ = c.dma_map(0x10000, 0x2000, Some(&memfd), 0, 3);
    let _ = c.dma_unmap(0x10000, 0x2000);
    let _ = c.reset();
    let _ = c.migration_feature();
    let _ = c.set_mig_state(1);
    let _ = c.read_mig_data();
    let mut bits = [0u64; 1];
    let _ = c.dma_logging_report(0, 64 * 4096, 4096, &mut bits);
    drop(server_end);
});
