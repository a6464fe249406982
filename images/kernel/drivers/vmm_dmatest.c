// SPDX-License-Identifier: GPL-2.0
/*
 * vmm_dmatest: the guest-side DMA test suite of the vmm project.
 *
 * Binds to the project's DMA test device (PCI 1234:7eed, served by the VMM's
 * dma-test-device process over vfio-user) and runs DMA through the Linux DMA
 * API, so that every mapping goes through the IOMMU driver in front of the
 * device (virtio-iommu in the project's VMs). The suite runs after deferred
 * probes and after the net suite (late_initcall_sync). Results are printed in
 * KTAP on the console; then the VM's verdict (vmm_verdict.c) ends the VM
 * through the VMM's test-exit port (I/O port 0x604) with the number of failed
 * cases as the VMM's exit status.
 *
 * Guest user space cannot run on the development hosts, so the suite runs in
 * the kernel. The hosts run this code in KVM's instruction emulator: bulk
 * compares and fills use string instructions (one emulated instruction each).
 *
 * Parameters (kernel command line, vmm_dmatest.<name>=):
 *   cases      comma-separated case names, or "all" (default): copy, fill,
 *              dirty_sparse, sg, coherent, map_unmap, fault_ro, fault_unmapped,
 *              fault_stale, latency, throughput
 *   max_size   largest copy/fill in bytes (default 4 MiB)
 *   cycles     map/unmap cycles of the many-small-mappings case (default 100000)
 *   samples    map+unmap latency samples (default 10000)
 *   exit_vm    end the VM with the verdict when done (default 1)
 *   required   without a DMA test device, report a failure and end the VM (default 0;
 *              without it, a kernel booted with no test device is left alone)
 *   concurrent rounds of the concurrent suite per CPU (default 0: not run). After the
 *              per-device suites, one kthread per online CPU, all started at once, each
 *              round: map, copy, unmap and verify on its own device (CPU i takes device
 *              i mod n), map, fill, unmap and verify on the device all CPUs share (the
 *              first), and read and compare 16 KiB of the disk below
 *   disk       block device the concurrent suite reads through raw bios (default "": none;
 *              "vda" for the first virtio-blk disk); its first 256 KiB, read once before
 *              the workers start, is what every later read must return
 *   break_copy test only (default 0): after each transfer of the copy case, the last
 *              byte of the source is changed before the check, so that the case fails
 *              through its own check; the project's tests use it to show that a failing
 *              case fails the run
 *   hotplug    devices to wait for after boot (default 0): the suite then waits, one device
 *              at a time, for a DMA test device the VMM hot-adds (ACPI PCI hot-plug), runs
 *              on it, says "# vmm_dmatest: hot-plugged device N of M done", and waits for
 *              the next; the verdict comes after the last (or after hotplug_wait seconds
 *              without one: a failure). A device removed (ejected) on the way is let go.
 *   hotplug_wait  seconds to wait for each hot-added device (default 600)
 */

#include <linux/bio.h>
#include <linux/bitmap.h>
#include <linux/blkdev.h>
#include <linux/completion.h>
#include <linux/delay.h>
#include <linux/dma-mapping.h>
#include <linux/interrupt.h>
#include <linux/io.h>
#include <linux/iommu.h>
#include <linux/kthread.h>
#include <linux/ktime.h>
#include <linux/memblock.h>
#include <linux/module.h>
#include <linux/pci.h>
#include <linux/scatterlist.h>
#include <linux/slab.h>
#include <linux/sort.h>
#include <linux/string.h>
#include <linux/vmalloc.h>

#include "vmm_tests.h"

#define DT_VENDOR	0x1234
#define DT_DEVICE	0x7eed
#define DT_ID		0x7eedd4a7

#define REG_ID		0x00
#define REG_SRC		0x08
#define REG_DST		0x10
#define REG_LEN		0x18
#define REG_OP		0x20
#define REG_FILL	0x24
#define REG_DOORBELL	0x28
#define REG_STATUS	0x2c
#define REG_ERROR	0x30
#define REG_FAULT_IOVA	0x38
#define REG_RESULT	0x40
#define REG_DELAY_US	0x48
#define REG_COMPLETED	0x50
#define REG_BYTES	0x58

#define OP_COPY		1
#define OP_FILL		2
#define OP_COMPARE	3
#define ST_BUSY		1
#define ST_DONE		2
#define ST_ERROR	3
#define ERR_FAULT_READ	1
#define ERR_FAULT_WRITE	2


static char *cases = "all";
module_param(cases, charp, 0444);
static uint max_size = 4 << 20;
module_param(max_size, uint, 0444);
static uint cycles = 100000;
module_param(cycles, uint, 0444);
static uint samples = 10000;
module_param(samples, uint, 0444);
static bool exit_vm = true;
module_param(exit_vm, bool, 0444);
static bool required;
module_param(required, bool, 0444);
static uint concurrent;
module_param(concurrent, uint, 0444);
static char *disk = "";
module_param(disk, charp, 0444);
static bool break_copy;
module_param(break_copy, bool, 0444);
static uint hotplug;
module_param(hotplug, uint, 0444);
static uint hotplug_wait = 600;
module_param(hotplug_wait, uint, 0444);


struct dt {
	struct pci_dev *pdev;
	struct device *dev;
	void __iomem *bar;
	bool iommu;
	bool lazy;
	int irq;
	struct completion done;
	/* One operation at a time: held around dt_op() where CPUs share the device. */
	struct mutex lock;
	unsigned long irqs;
	/* The suite's own account of its traffic, to compare with the VMM's counters. */
	u64 transfers, bytes, maps, unmaps;
	unsigned int n, failed, skipped;
};

#define MAX_DEVICES 8
static struct dt *dts[MAX_DEVICES];
static unsigned int ndts;
/* Set when the boot-time suites are done: a device probed later was hot-added. */
static bool dt_booted;
/* Hot-added devices waiting for their suite, in arrival order, and who waits for them. */
static struct dt *dt_hot[MAX_DEVICES];
static unsigned int dt_nhot;
static DECLARE_WAIT_QUEUE_HEAD(dt_hot_wait);
static DEFINE_MUTEX(dt_list_lock);
/* Guest page frames the devices wrote (by the suite's account), one bit per PFN. */
static unsigned long *written;
static unsigned long written_bits;

struct dt_result {
	u32 status, error;
	u64 fault_iova, result;
};

static void dt_w64(struct dt *d, u32 reg, u64 v)
{
	iowrite32(lower_32_bits(v), d->bar + reg);
	iowrite32(upper_32_bits(v), d->bar + reg + 4);
}

static u64 dt_r64(struct dt *d, u32 reg)
{
	return ioread32(d->bar + reg) | ((u64)ioread32(d->bar + reg + 4) << 32);
}

static irqreturn_t dt_irq(int irq, void *data)
{
	struct dt *d = data;

	d->irqs++;
	complete(&d->done);
	return IRQ_HANDLED;
}

/* Runs one operation and waits for its end (interrupt, then the status register). */
static int dt_op(struct dt *d, u32 op, u64 src, u64 dst, u64 len, u8 fill,
		 struct dt_result *r)
{
	u64 deadline;
	u32 s;

	reinit_completion(&d->done);
	dt_w64(d, REG_SRC, src);
	dt_w64(d, REG_DST, dst);
	dt_w64(d, REG_LEN, len);
	iowrite32(op, d->bar + REG_OP);
	iowrite32(fill, d->bar + REG_FILL);
	iowrite32(0, d->bar + REG_DELAY_US);
	iowrite32(1, d->bar + REG_DOORBELL);
	if (d->irq >= 0)
		wait_for_completion_timeout(&d->done, msecs_to_jiffies(5000));
	deadline = ktime_get_ns() + 10ULL * NSEC_PER_SEC;
	while ((s = ioread32(d->bar + REG_STATUS)) == ST_BUSY) {
		if (ktime_get_ns() > deadline)
			return -ETIMEDOUT;
		cpu_relax();
	}
	r->status = s;
	r->error = ioread32(d->bar + REG_ERROR);
	r->fault_iova = dt_r64(d, REG_FAULT_IOVA);
	r->result = dt_r64(d, REG_RESULT);
	if (s == ST_DONE) {
		d->transfers++;
		d->bytes += len;
	}
	return 0;
}

/* Records that the device wrote [va, va + len) (kernel linear-map or vmalloc address). */
static void dt_written(struct dt *d, const void *va, size_t len)
{
	unsigned long p, end;

	if (!written || !len)
		return;
	end = (unsigned long)va + len - 1;
	for (p = (unsigned long)va & PAGE_MASK; p <= end; p += PAGE_SIZE) {
		unsigned long pfn = is_vmalloc_addr((void *)p) ? vmalloc_to_pfn((void *)p) :
								    PHYS_PFN(virt_to_phys((void *)p));

		if (pfn < written_bits)
			set_bit(pfn, written);
	}
}

/* A pattern different in every byte of a page and in every page. */
static void dt_pattern(u8 *p, size_t n, u8 seed)
{
	size_t i, off;

	for (i = 0; i < min_t(size_t, n, PAGE_SIZE); i++)
		p[i] = (u8)(i * 31 + seed);
	for (off = PAGE_SIZE; off < n; off += PAGE_SIZE)
		vmm_copy(p + off, p, min_t(size_t, n - off, PAGE_SIZE));
	for (off = 0; off + 8 <= n; off += PAGE_SIZE)
		*(u64 *)(p + off) = ((off / PAGE_SIZE) << 8) | seed;
}

static bool dt_selected(const char *name)
{
	const char *p = cases;
	size_t len = strlen(name);

	if (!strcmp(cases, "all"))
		return true;
	while (p && *p) {
		if (!strncmp(p, name, len) && (p[len] == ',' || p[len] == '\0'))
			return true;
		p = strchr(p, ',');
		if (p)
			p++;
	}
	return false;
}

static void dt_report(struct dt *d, const char *name, int err, const char *why)
{
	d->n++;
	if (err > 0) {
		d->skipped++;
		pr_info("ok %u %s # SKIP %s\n", d->n, name, why);
	} else if (err == 0) {
		pr_info("ok %u %s\n", d->n, name);
	} else {
		d->failed++;
		pr_info("not ok %u %s # %s (%d)\n", d->n, name, why, err);
	}
}

#define CHECK(cond, msg)                \
	do {                            \
		if (!(cond)) {          \
			*why = (msg);   \
			ret = -EIO;     \
			goto out;       \
		}                       \
	} while (0)

/*
 * Physically contiguous zeroed buffers of at least `need` bytes, or of the largest block the
 * page allocator has (4 MiB) when `need` is larger: the copy of 4 MiB has no room for a guard
 * after it. Returns the room in *room.
 */
static u8 *dt_alloc(size_t need, struct page **page, size_t *room)
{
	unsigned int order = min_t(unsigned int, get_order(need), MAX_PAGE_ORDER);

	*page = alloc_pages(GFP_KERNEL | __GFP_ZERO | __GFP_NOWARN, order);
	*room = PAGE_SIZE << order;
	return *page ? page_address(*page) : NULL;
}

static void dt_free(u8 *p, struct page *page, size_t room)
{
	if (p)
		__free_pages(page, get_order(room));
}

static int case_copy(struct dt *d, size_t size, const char **why)
{
	struct page *sp, *dp;
	size_t sroom, droom;
	u8 *src = dt_alloc(size, &sp, &sroom);
	u8 *dst = dt_alloc(size + 64, &dp, &droom);
	size_t guard = min_t(size_t, droom - size, 64);
	dma_addr_t s = DMA_MAPPING_ERROR, t = DMA_MAPPING_ERROR;
	struct dt_result r;
	int ret = 0;

	CHECK(src && dst, "out of memory");
	dt_pattern(src, size, (u8)size);
	vmm_set(dst, 0xcc, size + guard);
	s = dma_map_single(d->dev, src, size, DMA_TO_DEVICE);
	t = dma_map_single(d->dev, dst, size, DMA_FROM_DEVICE);
	CHECK(!dma_mapping_error(d->dev, s) && !dma_mapping_error(d->dev, t), "dma_map_single failed");
	d->maps += 2;
	ret = dt_op(d, OP_COPY, s, t, size, 0, &r);
	if (ret) {
		*why = "device timeout";
		goto out;
	}
	CHECK(r.status == ST_DONE, "copy did not complete");
	dt_written(d, dst, size);
	dma_unmap_single(d->dev, t, size, DMA_FROM_DEVICE);
	t = DMA_MAPPING_ERROR;
	d->unmaps++;
	if (break_copy)
		src[size - 1] ^= 0xff;
	CHECK(vmm_same(src, dst, size), "copied bytes differ");
	CHECK(vmm_all(dst + size, 0xcc, guard), "bytes after the buffer were written");
out:
	if (!dma_mapping_error(d->dev, t)) {
		dma_unmap_single(d->dev, t, size, DMA_FROM_DEVICE);
		d->unmaps++;
	}
	if (!dma_mapping_error(d->dev, s)) {
		dma_unmap_single(d->dev, s, size, DMA_TO_DEVICE);
		d->unmaps++;
	}
	dt_free(src, sp, sroom);
	dt_free(dst, dp, droom);
	return ret;
}

static int case_fill(struct dt *d, size_t size, const char **why)
{
	struct page *dp;
	size_t droom;
	u8 *dst = dt_alloc(size + 64, &dp, &droom);
	size_t guard = min_t(size_t, droom - size, 64);
	dma_addr_t t = DMA_MAPPING_ERROR;
	struct dt_result r;
	int ret = 0;

	CHECK(dst, "out of memory");
	vmm_set(dst, 0x11, size + guard);
	t = dma_map_single(d->dev, dst, size, DMA_FROM_DEVICE);
	CHECK(!dma_mapping_error(d->dev, t), "dma_map_single failed");
	d->maps++;
	ret = dt_op(d, OP_FILL, 0, t, size, 0xa5, &r);
	if (ret) {
		*why = "device timeout";
		goto out;
	}
	if (r.status == ST_DONE)
		dt_written(d, dst, size);
	dma_unmap_single(d->dev, t, size, DMA_FROM_DEVICE);
	t = DMA_MAPPING_ERROR;
	d->unmaps++;
	CHECK(r.status == ST_DONE, "fill did not complete");
	CHECK(vmm_all(dst, 0xa5, size), "filled bytes differ");
	CHECK(vmm_all(dst + size, 0x11, guard), "bytes after the buffer were written");
out:
	if (!dma_mapping_error(d->dev, t)) {
		dma_unmap_single(d->dev, t, size, DMA_FROM_DEVICE);
		d->unmaps++;
	}
	dt_free(dst, dp, droom);
	return ret;
}

/*
 * The device writes three of the sixteen pages of one writable mapping: a dirty log that
 * counts whole writable mappings (a device that cannot report its writes) shows sixteen, and
 * the page-set comparison with the VMM's dirty log tells them apart.
 */
static int case_dirty_sparse(struct dt *d, const char **why)
{
	enum { PAGES = 16 };
	static const unsigned int hit[] = { 0, 5, 11 };
	struct page *pg;
	size_t room;
	u8 *buf = dt_alloc(PAGES * PAGE_SIZE, &pg, &room);
	dma_addr_t a = DMA_MAPPING_ERROR;
	struct dt_result r;
	int i, k, ret = 0;

	CHECK(buf, "out of memory");
	vmm_set(buf, 0x5e, PAGES * PAGE_SIZE);
	a = dma_map_single(d->dev, buf, PAGES * PAGE_SIZE, DMA_FROM_DEVICE);
	CHECK(!dma_mapping_error(d->dev, a), "dma_map_single failed");
	d->maps++;
	for (i = 0; i < ARRAY_SIZE(hit); i++) {
		ret = dt_op(d, OP_FILL, 0, a + hit[i] * PAGE_SIZE, PAGE_SIZE, 0xd0 + i, &r);
		CHECK(!ret && r.status == ST_DONE, "fill of one page failed");
		dt_written(d, buf + hit[i] * PAGE_SIZE, PAGE_SIZE);
	}
	dma_unmap_single(d->dev, a, PAGES * PAGE_SIZE, DMA_FROM_DEVICE);
	a = DMA_MAPPING_ERROR;
	d->unmaps++;
	for (i = 0; i < PAGES; i++) {
		u8 want = 0x5e;

		for (k = 0; k < ARRAY_SIZE(hit); k++)
			if (hit[k] == i)
				want = 0xd0 + k;
		CHECK(vmm_all(buf + i * PAGE_SIZE, want, PAGE_SIZE),
		      "a page holds what the device did not write there");
	}
out:
	if (!dma_mapping_error(d->dev, a)) {
		dma_unmap_single(d->dev, a, PAGES * PAGE_SIZE, DMA_FROM_DEVICE);
		d->unmaps++;
	}
	dt_free(buf, pg, room);
	return ret;
}

/* 64 scattered pages mapped as one scatterlist; the IOMMU makes them one IOVA range. */
static int case_sg(struct dt *d, const char **why)
{
	enum { PAGES = 64 };
	struct page **pages = kcalloc(PAGES, sizeof(*pages), GFP_KERNEL), *dp = NULL;
	struct scatterlist *sg = kcalloc(PAGES, sizeof(*sg), GFP_KERNEL);
	size_t droom;
	u8 *dst = dt_alloc(PAGES * PAGE_SIZE, &dp, &droom);
	dma_addr_t t = DMA_MAPPING_ERROR;
	struct dt_result r;
	int i, nents = 0, ret = 0;

	CHECK(pages && sg && dst, "out of memory");
	sg_init_table(sg, PAGES);
	for (i = 0; i < PAGES; i++) {
		/* Order-1 blocks of which one page is used: the pages are not contiguous. */
		pages[i] = alloc_pages(GFP_KERNEL, 1);
		CHECK(pages[i], "out of memory");
		dt_pattern(page_address(pages[i]), PAGE_SIZE, (u8)(i + 1));
		sg_set_page(&sg[i], pages[i], PAGE_SIZE, 0);
	}
	nents = dma_map_sg(d->dev, sg, PAGES, DMA_TO_DEVICE);
	CHECK(nents > 0, "dma_map_sg failed");
	d->maps++;
	t = dma_map_single(d->dev, dst, PAGES * PAGE_SIZE, DMA_FROM_DEVICE);
	CHECK(!dma_mapping_error(d->dev, t), "dma_map_single failed");
	d->maps++;
	if (d->iommu) {
		if (nents != 1)
			pr_info("# scatter_gather: %d DMA segments\n", nents);
		CHECK(nents == 1, "the IOMMU did not merge the list into one IOVA range");
		ret = dt_op(d, OP_COPY, sg_dma_address(sg), t, PAGES * PAGE_SIZE, 0, &r);
		CHECK(!ret && r.status == ST_DONE, "copy of the list failed");
	} else {
		for (i = 0; i < nents; i++) {
			ret = dt_op(d, OP_COPY, sg_dma_address(&sg[i]), t + i * PAGE_SIZE,
				    sg_dma_len(&sg[i]), 0, &r);
			CHECK(!ret && r.status == ST_DONE, "copy of an element failed");
		}
	}
	dt_written(d, dst, PAGES * PAGE_SIZE);
	dma_unmap_single(d->dev, t, PAGES * PAGE_SIZE, DMA_FROM_DEVICE);
	t = DMA_MAPPING_ERROR;
	d->unmaps++;
	for (i = 0; i < PAGES; i++)
		CHECK(vmm_same(dst + i * PAGE_SIZE, page_address(pages[i]), PAGE_SIZE),
		      "a page of the list differs");
out:
	if (!dma_mapping_error(d->dev, t)) {
		dma_unmap_single(d->dev, t, PAGES * PAGE_SIZE, DMA_FROM_DEVICE);
		d->unmaps++;
	}
	if (nents > 0) {
		dma_unmap_sg(d->dev, sg, PAGES, DMA_TO_DEVICE);
		d->unmaps++;
	}
	for (i = 0; pages && i < PAGES; i++)
		if (pages[i])
			__free_pages(pages[i], 1);
	dt_free(dst, dp, droom);
	kfree(sg);
	kfree(pages);
	return ret;
}

static int case_coherent(struct dt *d, const char **why)
{
	const size_t size = 64 << 10;
	dma_addr_t a, b;
	u8 *x = dma_alloc_coherent(d->dev, size, &a, GFP_KERNEL);
	u8 *y = dma_alloc_coherent(d->dev, size, &b, GFP_KERNEL);
	struct dt_result r;
	int ret = 0;

	CHECK(x && y, "dma_alloc_coherent failed");
	d->maps += 2;
	ret = dt_op(d, OP_FILL, 0, a, size, 0x3c, &r);
	CHECK(!ret && r.status == ST_DONE, "fill of a coherent buffer failed");
	dt_written(d, x, size);
	CHECK(vmm_all(x, 0x3c, size), "the CPU does not see the device's fill");
	dt_pattern(x, size, 0x42);
	ret = dt_op(d, OP_COPY, a, b, size, 0, &r);
	CHECK(!ret && r.status == ST_DONE, "copy between coherent buffers failed");
	dt_written(d, y, size);
	CHECK(vmm_same(x, y, size), "coherent copy differs");
	ret = dt_op(d, OP_COMPARE, a, b, size, 0, &r);
	CHECK(!ret && r.result == 0, "the device compares them different");
out:
	if (x) {
		dma_free_coherent(d->dev, size, x, a);
		d->unmaps++;
	}
	if (y) {
		dma_free_coherent(d->dev, size, y, b);
		d->unmaps++;
	}
	return ret;
}

/* Many small, short-lived mappings: map a page, let the device fill a word, unmap. */
static int case_map_unmap(struct dt *d, const char **why)
{
	struct page *pg = alloc_page(GFP_KERNEL | __GFP_ZERO);
	u8 *p = pg ? page_address(pg) : NULL;
	struct dt_result r;
	dma_addr_t a;
	u64 t0 = ktime_get_ns();
	unsigned int i;
	int ret = 0;

	CHECK(p, "out of memory");
	for (i = 0; i < cycles; i++) {
		a = dma_map_page(d->dev, pg, 0, PAGE_SIZE, DMA_BIDIRECTIONAL);
		CHECK(!dma_mapping_error(d->dev, a), "dma_map_page failed");
		d->maps++;
		/* Every 1024th mapping is used by the device and checked. */
		if (!(i & 1023)) {
			ret = dt_op(d, OP_FILL, 0, a + (i & 0xf00), 8, (u8)i, &r);
			CHECK(!ret && r.status == ST_DONE, "DMA through a short-lived mapping failed");
			dt_written(d, p + (i & 0xf00), 8);
		}
		dma_unmap_page(d->dev, a, PAGE_SIZE, DMA_BIDIRECTIONAL);
		d->unmaps++;
		if (!(i & 1023))
			CHECK(vmm_all(p + (i & 0xf00), (u8)i, 8), "device write lost");
		/* Progress of a long run: cycles so far and the rate. */
		if (i && !(i % 10000)) {
			u64 ms = (ktime_get_ns() - t0) / NSEC_PER_MSEC;

			pr_info("# map_unmap: %u of %u cycles, %llu per second so far\n", i, cycles,
				ms ? (u64)i * 1000 / ms : 0);
		}
	}
	pr_info("# map_unmap: %u cycles in %llu ms\n", cycles,
		(ktime_get_ns() - t0) / NSEC_PER_MSEC);
out:
	if (pg)
		__free_page(pg);
	return ret;
}

/* A device write into a DMA_TO_DEVICE (read-only) mapping must fault. */
static int case_fault_ro(struct dt *d, const char **why)
{
	struct page *pg;
	u8 *p = NULL;
	dma_addr_t a = DMA_MAPPING_ERROR;
	struct dt_result r;
	int ret = 0;

	if (!d->iommu)
		return 1;
	pg = alloc_page(GFP_KERNEL);
	p = pg ? page_address(pg) : NULL;
	CHECK(p, "out of memory");
	vmm_set(p, 0x77, PAGE_SIZE);
	a = dma_map_page(d->dev, pg, 0, PAGE_SIZE, DMA_TO_DEVICE);
	CHECK(!dma_mapping_error(d->dev, a), "dma_map_page failed");
	d->maps++;
	ret = dt_op(d, OP_FILL, 0, a, 64, 0x11, &r);
	CHECK(!ret, "device timeout");
	CHECK(r.status == ST_ERROR && r.error == ERR_FAULT_WRITE, "the write was not refused");
	CHECK(r.fault_iova == a, "wrong faulting IOVA");
	CHECK(vmm_all(p, 0x77, PAGE_SIZE), "read-only memory was written");
	pr_info("# fault_ro: expect a virtio-iommu fault event for IOVA %#llx\n", (u64)a);
out:
	if (!dma_mapping_error(d->dev, a)) {
		dma_unmap_page(d->dev, a, PAGE_SIZE, DMA_TO_DEVICE);
		d->unmaps++;
	}
	if (p)
		__free_page(pg);
	return ret;
}

/* A transfer to an IOVA that was never mapped must fault. */
static int case_fault_unmapped(struct dt *d, const char **why)
{
	const u64 iova = 0x10000; /* Linux hands out IOVAs from the top of the aperture */
	struct dt_result r;
	int ret;

	if (!d->iommu)
		return 1;
	ret = dt_op(d, OP_FILL, 0, iova, 64, 0x22, &r);
	CHECK(!ret, "device timeout");
	CHECK(r.status == ST_ERROR && r.error == ERR_FAULT_WRITE, "the write was not refused");
	CHECK(r.fault_iova == iova, "wrong faulting IOVA");
	pr_info("# fault_unmapped: expect a virtio-iommu fault event for IOVA %#llx\n", iova);
out:
	return ret;
}

/*
 * A transfer to an IOVA whose mapping was removed must fault. In lazy mode the UNMAP
 * reaches the IOMMU only when the flush queue is flushed, so the test flushes it.
 */
static int case_fault_stale(struct dt *d, const char **why)
{
	struct page *pg;
	u8 *p = NULL;
	dma_addr_t a;
	struct dt_result r;
	int ret = 0;

	if (!d->iommu)
		return 1;
	pg = alloc_page(GFP_KERNEL);
	p = pg ? page_address(pg) : NULL;
	CHECK(p, "out of memory");
	a = dma_map_page(d->dev, pg, 0, PAGE_SIZE, DMA_FROM_DEVICE);
	CHECK(!dma_mapping_error(d->dev, a), "dma_map_page failed");
	d->maps++;
	ret = dt_op(d, OP_FILL, 0, a, 64, 0x33, &r);
	CHECK(!ret && r.status == ST_DONE, "DMA before the unmap failed");
	dt_written(d, p, 64);
	dma_unmap_page(d->dev, a, PAGE_SIZE, DMA_FROM_DEVICE);
	d->unmaps++;
	/*
	 * Lazy invalidation leaves the UNMAP queued until the flush queue's timer fires.
	 * Flush now: the virtio-iommu driver sends what it queued and waits for the
	 * device's answers (viommu_sync_req), so the UNMAP has completed when this returns.
	 */
	if (d->lazy)
		iommu_flush_iotlb_all(iommu_get_domain_for_dev(d->dev));
	vmm_set(p, 0x44, PAGE_SIZE);
	ret = dt_op(d, OP_FILL, 0, a, 64, 0x55, &r);
	CHECK(!ret, "device timeout");
	CHECK(r.status == ST_ERROR && r.error == ERR_FAULT_WRITE, "DMA to an unmapped IOVA was not refused");
	CHECK(vmm_all(p, 0x44, PAGE_SIZE), "memory behind a stale IOVA was written");
	pr_info("# fault_stale: expect a virtio-iommu fault event for IOVA %#llx\n", (u64)a);
out:
	if (p)
		__free_page(pg);
	return ret;
}

static int cmp_u64(const void *a, const void *b)
{
	u64 x = *(const u64 *)a, y = *(const u64 *)b;

	return x < y ? -1 : x > y;
}

/*
 * The distribution of sorted samples (ns) in power-of-two buckets, one line:
 * "# latency histogram: <bucket upper bound ns>:<count> ..." (empty buckets left out).
 */
static void dt_histogram(const u64 *lat, unsigned int n)
{
	char line[512] = "";
	int len = 0;
	unsigned int i = 0;
	u64 bound = 1024;

	while (i < n && len < (int)sizeof(line) - 32) {
		unsigned int c = 0;

		while (i < n && lat[i] < bound) {
			c++;
			i++;
		}
		if (c)
			len += scnprintf(line + len, sizeof(line) - len, " %llu:%u", bound, c);
		if (bound > (U64_MAX >> 1))
			break;
		bound <<= 1;
	}
	pr_info("# latency histogram:%s\n", line);
}

/* map+unmap latency of one page, in the spirit of dma_map_benchmark. */
static int case_latency(struct dt *d, const char **why)
{
	struct page *pg = alloc_page(GFP_KERNEL);
	u64 *lat = kvmalloc_array(samples, sizeof(u64), GFP_KERNEL);
	u64 sum = 0, t;
	dma_addr_t a;
	unsigned int i;
	int ret = 0;

	CHECK(pg && lat && samples, "out of memory");
	for (i = 0; i < samples; i++) {
		t = ktime_get_ns();
		a = dma_map_page(d->dev, pg, 0, PAGE_SIZE, DMA_TO_DEVICE);
		CHECK(!dma_mapping_error(d->dev, a), "dma_map_page failed");
		dma_unmap_page(d->dev, a, PAGE_SIZE, DMA_TO_DEVICE);
		lat[i] = ktime_get_ns() - t;
		sum += lat[i];
		d->maps++;
		d->unmaps++;
	}
	sort(lat, samples, sizeof(u64), cmp_u64, NULL);
	pr_info("# latency: map+unmap of 4 KiB (%s): avg %llu ns, p99 %llu ns over %u samples\n",
		d->iommu ? (d->lazy ? "lazy" : "strict") : "no IOMMU", sum / samples,
		lat[samples * 99 / 100], samples);
	dt_histogram(lat, samples);
out:
	kvfree(lat);
	if (pg)
		__free_page(pg);
	return ret;
}

/* Prints bytes per nanosecond-interval as MB/s with two decimals. */
static void dt_rate(const char *what, size_t size, const char *mode, u64 bytes, u64 ns)
{
	u64 centi = ns ? bytes * 100 * 1000 / ns : 0; /* hundredths of MB/s */

	pr_info("# throughput: %zu B %s: %llu.%02llu MB/s (%s)\n", size, what, centi / 100,
		centi % 100, mode);
}

/*
 * Guest-measured DMA throughput of copies of 4 KiB and 1 MiB: with a map and an unmap of
 * both buffers around every copy (what a driver does), and with the buffers mapped once.
 */
static int case_throughput(struct dt *d, const char **why)
{
	static const size_t sizes[] = { 4096, 1 << 20 };
	const char *mode = d->iommu ? (d->lazy ? "vIOMMU lazy" : "vIOMMU strict") : "no IOMMU";
	struct page *sp, *dp;
	size_t sroom, droom;
	u8 *src = dt_alloc(1 << 20, &sp, &sroom), *dst = dt_alloc(1 << 20, &dp, &droom);
	struct dt_result r;
	dma_addr_t s = DMA_MAPPING_ERROR, t = DMA_MAPPING_ERROR;
	size_t cur = 0;
	int i, k, ret = 0;

	CHECK(src && dst, "out of memory");
	for (k = 0; k < ARRAY_SIZE(sizes); k++) {
		size_t size = sizes[k];
		int rounds = size == 4096 ? 256 : 16;
		u64 t0 = ktime_get_ns();

		for (i = 0; i < rounds; i++) {
			cur = size;
			s = dma_map_single(d->dev, src, size, DMA_TO_DEVICE);
			t = dma_map_single(d->dev, dst, size, DMA_FROM_DEVICE);
			CHECK(!dma_mapping_error(d->dev, s) && !dma_mapping_error(d->dev, t),
			      "dma_map_single failed");
			ret = dt_op(d, OP_COPY, s, t, size, 0, &r);
			dma_unmap_single(d->dev, t, size, DMA_FROM_DEVICE);
			dma_unmap_single(d->dev, s, size, DMA_TO_DEVICE);
			s = t = DMA_MAPPING_ERROR;
			d->maps += 2;
			d->unmaps += 2;
			CHECK(!ret && r.status == ST_DONE, "copy failed");
			dt_written(d, dst, size);
		}
		dt_rate("copies with map and unmap", size, mode, (u64)size * rounds,
			ktime_get_ns() - t0);

		s = dma_map_single(d->dev, src, size, DMA_TO_DEVICE);
		t = dma_map_single(d->dev, dst, size, DMA_FROM_DEVICE);
		cur = size;
		CHECK(!dma_mapping_error(d->dev, s) && !dma_mapping_error(d->dev, t),
		      "dma_map_single failed");
		d->maps += 2;
		t0 = ktime_get_ns();
		for (i = 0; i < rounds; i++) {
			ret = dt_op(d, OP_COPY, s, t, size, 0, &r);
			CHECK(!ret && r.status == ST_DONE, "copy failed");
		}
		dt_rate("copies, mapped once", size, mode, (u64)size * rounds, ktime_get_ns() - t0);
		dt_written(d, dst, size);
		dma_unmap_single(d->dev, t, size, DMA_FROM_DEVICE);
		dma_unmap_single(d->dev, s, size, DMA_TO_DEVICE);
		s = t = DMA_MAPPING_ERROR;
		d->unmaps += 2;
	}
out:
	if (!dma_mapping_error(d->dev, t)) {
		dma_unmap_single(d->dev, t, cur, DMA_FROM_DEVICE);
		d->unmaps++;
	}
	if (!dma_mapping_error(d->dev, s)) {
		dma_unmap_single(d->dev, s, cur, DMA_TO_DEVICE);
		d->unmaps++;
	}
	dt_free(src, sp, sroom);
	dt_free(dst, dp, droom);
	return ret;
}

static void dt_run_suite(struct dt *d)
{
	static const size_t sizes[] = { 1, 7, 512, 4096, 4097, 65536, 1 << 20, 4 << 20 };
	struct iommu_domain *dom = iommu_get_domain_for_dev(d->dev);
	const char *why;
	char name[32];
	int i, planned = 0, err;

	d->iommu = dom && dom->type != IOMMU_DOMAIN_IDENTITY;
	d->lazy = dom && dom->type == IOMMU_DOMAIN_DMA_FQ;
	for (i = 0; i < ARRAY_SIZE(sizes); i++)
		if (sizes[i] <= max_size)
			planned += dt_selected("copy") + dt_selected("fill");
	planned += dt_selected("dirty_sparse") + dt_selected("sg") + dt_selected("coherent") +
		   dt_selected("map_unmap") +
		   dt_selected("fault_ro") + dt_selected("fault_unmapped") +
		   dt_selected("fault_stale") + dt_selected("latency") + dt_selected("throughput");
	pr_info("KTAP version 1\n");
	pr_info("# vmm_dmatest: %s %s, cases=%s max_size=%u cycles=%u samples=%u\n",
		dev_name(d->dev),
		d->iommu ? (d->lazy ? "behind an IOMMU, lazy invalidation" :
				      "behind an IOMMU, strict invalidation") : "no IOMMU",
		cases, max_size, cycles, samples);
	pr_info("1..%d\n", planned);

#define RUN(sel, label, call)                              \
	do {                                               \
		if (dt_selected(sel)) {                    \
			why = "";                          \
			err = (call);                      \
			dt_report(d, label, err, err > 0 ? "the device is not behind an IOMMU" : why); \
		}                                          \
	} while (0)

	for (i = 0; i < ARRAY_SIZE(sizes); i++) {
		if (sizes[i] > max_size)
			continue;
		snprintf(name, sizeof(name), "copy_%zu", sizes[i]);
		RUN("copy", name, case_copy(d, sizes[i], &why));
	}
	for (i = 0; i < ARRAY_SIZE(sizes); i++) {
		if (sizes[i] > max_size)
			continue;
		snprintf(name, sizeof(name), "fill_%zu", sizes[i]);
		RUN("fill", name, case_fill(d, sizes[i], &why));
	}
	RUN("dirty_sparse", "dirty_sparse", case_dirty_sparse(d, &why));
	RUN("sg", "scatter_gather", case_sg(d, &why));
	RUN("coherent", "coherent", case_coherent(d, &why));
	RUN("map_unmap", "map_unmap", case_map_unmap(d, &why));
	RUN("fault_ro", "fault_read_only", case_fault_ro(d, &why));
	RUN("fault_unmapped", "fault_unmapped", case_fault_unmapped(d, &why));
	RUN("fault_stale", "fault_already_unmapped", case_fault_stale(d, &why));
	RUN("latency", "latency", case_latency(d, &why));
	RUN("throughput", "throughput", case_throughput(d, &why));

	pr_info("# traffic: transfers=%llu bytes=%llu dma_maps=%llu dma_unmaps=%llu irqs=%lu\n",
		d->transfers, d->bytes, d->maps, d->unmaps, d->irqs);
	pr_info("# device: completed=%llu bytes=%llu\n", dt_r64(d, REG_COMPLETED),
		dt_r64(d, REG_BYTES));
	pr_info("# vmm_dmatest: %u passed, %u failed, %u skipped\n",
		d->n - d->failed - d->skipped, d->failed, d->skipped);
}

static int dt_probe(struct pci_dev *pdev, const struct pci_device_id *id)
{
	struct dt *d;
	int ret;

	d = devm_kzalloc(&pdev->dev, sizeof(*d), GFP_KERNEL);
	if (!d)
		return -ENOMEM;
	d->pdev = pdev;
	d->dev = &pdev->dev;
	init_completion(&d->done);
	mutex_init(&d->lock);
	ret = pcim_enable_device(pdev);
	if (ret)
		return ret;
	pci_set_master(pdev);
	d->bar = pcim_iomap(pdev, 0, 0);
	if (!d->bar)
		return -ENOMEM;
	if (ioread32(d->bar + REG_ID) != DT_ID) {
		dev_err(d->dev, "not the DMA test device\n");
		return -ENODEV;
	}
	ret = dma_set_mask_and_coherent(d->dev, DMA_BIT_MASK(64));
	if (ret)
		return ret;
	/* The device takes any length up to 64 MiB; without this, 64 KiB segments. */
	dma_set_max_seg_size(d->dev, SZ_64M);
	if (!written) {
		written_bits = max_pfn;
		written = bitmap_zalloc(max_pfn, GFP_KERNEL);
	}
	d->irq = -1;
	if (pci_alloc_irq_vectors(pdev, 1, 1, PCI_IRQ_MSIX) == 1) {
		d->irq = pci_irq_vector(pdev, 0);
		if (devm_request_irq(d->dev, d->irq, dt_irq, 0, "vmm_dmatest", d))
			d->irq = -1;
	}
	dev_info(d->dev, "DMA test device, completion %s\n", d->irq >= 0 ? "by MSI-X" : "polled");
	mutex_lock(&dt_list_lock);
	if (ndts == MAX_DEVICES) {
		mutex_unlock(&dt_list_lock);
		return -ENOSPC;
	}
	dts[ndts++] = d;
	pci_set_drvdata(pdev, d);
	if (dt_booted) {
		dt_hot[dt_nhot++] = d;
		wake_up(&dt_hot_wait);
	}
	mutex_unlock(&dt_list_lock);
	return 0;
}

/* A hot-added device ejected: its suite ran (the VMM removes it after), it leaves the list. */
static void dt_remove(struct pci_dev *pdev)
{
	struct dt *d = pci_get_drvdata(pdev);
	unsigned int i;

	mutex_lock(&dt_list_lock);
	for (i = 0; i < ndts; i++) {
		if (dts[i] == d) {
			dts[i] = dts[--ndts];
			break;
		}
	}
	for (i = 0; i < dt_nhot; i++) {
		if (dt_hot[i] == d) {
			memmove(&dt_hot[i], &dt_hot[i + 1], (dt_nhot - i - 1) * sizeof(d));
			dt_nhot--;
			break;
		}
	}
	mutex_unlock(&dt_list_lock);
	pr_info("# vmm_dmatest: %s removed after %llu transfers\n", dev_name(d->dev), d->transfers);
}

static const struct pci_device_id dt_ids[] = {
	{ PCI_DEVICE(DT_VENDOR, DT_DEVICE) },
	{ }
};

static struct pci_driver dt_driver = {
	.name = "vmm_dmatest",
	.id_table = dt_ids,
	.probe = dt_probe,
	.remove = dt_remove,
};

static int __init dt_init(void)
{
	return pci_register_driver(&dt_driver);
}
device_initcall(dt_init);

/*
 * The concurrent suite: every online CPU maps, transfers, verifies and unmaps at the same
 * time, against its own device, the device all of them share, and the disk, so that MAP and
 * UNMAP requests for several domains (and for one domain from several CPUs) reach the
 * IOMMU interleaved.
 */
#define CC_DISK_PAGES	64	/* the reference: the disk's first 256 KiB */
#define CC_READ_PAGES	4	/* each round reads 16 KiB of it */
#define CC_MAX_SIZE	(64 << 10)

struct cc_worker {
	unsigned int cpu;
	struct dt *own, *shared;
	struct completion done;
	int err;
	const char *why;
	u64 own_maps, own_unmaps, shared_maps, shared_unmaps, disk_reads;
	unsigned int rounds, overlapped;
};

static struct block_device *cc_bdev;
static u8 *cc_ref;
static DECLARE_COMPLETION(cc_go);
/* Rounds in progress now: a round that starts while another is running overlapped it. */
static atomic_t cc_in_round = ATOMIC_INIT(0);

/* Reads `pages` pages at page `first` of the disk into `pg` with one bio, and waits. */
static int cc_read(struct page *pg, unsigned int first, unsigned int pages)
{
	struct bio *bio = bio_alloc(cc_bdev, 1, REQ_OP_READ, GFP_KERNEL);
	int ret;

	bio->bi_iter.bi_sector = (sector_t)first << (PAGE_SHIFT - SECTOR_SHIFT);
	__bio_add_page(bio, pg, pages * PAGE_SIZE, 0);
	ret = submit_bio_wait(bio);
	bio_put(bio);
	return ret;
}

/* Runs one operation on a device other CPUs may use at the same time. */
static int cc_op(struct dt *d, u32 op, u64 src, u64 dst, u64 len, u8 fill, struct dt_result *r)
{
	int ret;

	mutex_lock(&d->lock);
	ret = dt_op(d, op, src, dst, len, fill, r);
	mutex_unlock(&d->lock);
	return ret;
}

#define CC_CHECK(cond, msg)             \
	do {                            \
		if (!(cond)) {          \
			w->why = (msg); \
			ret = -EIO;     \
			goto out;       \
		}                       \
	} while (0)

static int cc_round(struct cc_worker *w, unsigned int r, u8 *src, u8 *dst, u8 *fb,
		    struct page *dpg)
{
	size_t size = PAGE_SIZE << (r % 5), off = (r % 4) * 1024;
	u8 seed = (u8)(w->cpu * 61 + r), *db = page_address(dpg);
	dma_addr_t s = DMA_MAPPING_ERROR, t = DMA_MAPPING_ERROR, f = DMA_MAPPING_ERROR;
	struct dt_result res;
	unsigned int first;
	int ret = 0;

	/* Own device: a copy of `size` bytes, both buffers mapped for it alone. */
	dt_pattern(src, size, seed);
	vmm_set(dst, 0xcc, size);
	s = dma_map_single(w->own->dev, src, size, DMA_TO_DEVICE);
	t = dma_map_single(w->own->dev, dst, size, DMA_FROM_DEVICE);
	CC_CHECK(!dma_mapping_error(w->own->dev, s) && !dma_mapping_error(w->own->dev, t),
	      "dma_map_single failed on the own device");
	w->own_maps += 2;
	ret = cc_op(w->own, OP_COPY, s, t, size, 0, &res);
	CC_CHECK(!ret && res.status == ST_DONE, "copy on the own device failed");
	dt_written(w->own, dst, size);
	dma_unmap_single(w->own->dev, t, size, DMA_FROM_DEVICE);
	dma_unmap_single(w->own->dev, s, size, DMA_TO_DEVICE);
	s = t = DMA_MAPPING_ERROR;
	w->own_unmaps += 2;
	CC_CHECK(vmm_same(src, dst, size), "copied bytes differ");

	/* Shared device: a fill of 512 bytes inside a page mapped for it alone. */
	vmm_set(fb, 0x11, PAGE_SIZE);
	f = dma_map_single(w->shared->dev, fb, PAGE_SIZE, DMA_FROM_DEVICE);
	CC_CHECK(!dma_mapping_error(w->shared->dev, f), "dma_map_single failed on the shared device");
	w->shared_maps++;
	ret = cc_op(w->shared, OP_FILL, 0, f + off, 512, seed, &res);
	CC_CHECK(!ret && res.status == ST_DONE, "fill on the shared device failed");
	dt_written(w->shared, fb + off, 512);
	dma_unmap_single(w->shared->dev, f, PAGE_SIZE, DMA_FROM_DEVICE);
	f = DMA_MAPPING_ERROR;
	w->shared_unmaps++;
	CC_CHECK(vmm_all(fb + off, seed, 512) && vmm_all(fb, 0x11, off) &&
	      vmm_all(fb + off + 512, 0x11, PAGE_SIZE - off - 512),
	      "the shared device's fill is wrong or out of place");

	/* Disk: 16 KiB somewhere in the reference. */
	if (cc_bdev) {
		first = (r * 7 + w->cpu * 13) % (CC_DISK_PAGES - CC_READ_PAGES + 1);
		vmm_set(db, 0xee, CC_READ_PAGES * PAGE_SIZE);
		ret = cc_read(dpg, first, CC_READ_PAGES);
		CC_CHECK(!ret, "disk read failed");
		w->disk_reads++;
		CC_CHECK(vmm_same(db, cc_ref + first * PAGE_SIZE, CC_READ_PAGES * PAGE_SIZE),
		      "the disk returned other data than the reference read");
	}
out:
	if (!dma_mapping_error(w->own->dev, t)) {
		dma_unmap_single(w->own->dev, t, size, DMA_FROM_DEVICE);
		w->own_unmaps++;
	}
	if (!dma_mapping_error(w->own->dev, s)) {
		dma_unmap_single(w->own->dev, s, size, DMA_TO_DEVICE);
		w->own_unmaps++;
	}
	if (!dma_mapping_error(w->shared->dev, f)) {
		dma_unmap_single(w->shared->dev, f, PAGE_SIZE, DMA_FROM_DEVICE);
		w->shared_unmaps++;
	}
	return ret;
}

static int cc_worker_fn(void *data)
{
	struct cc_worker *w = data;
	struct page *sp, *dp, *fp, *kp;
	size_t sroom, droom, froom, kroom;
	u8 *src = dt_alloc(CC_MAX_SIZE, &sp, &sroom), *dst = dt_alloc(CC_MAX_SIZE, &dp, &droom);
	u8 *fb = dt_alloc(PAGE_SIZE, &fp, &froom), *kb = dt_alloc(CC_READ_PAGES * PAGE_SIZE, &kp, &kroom);
	unsigned int r;

	wait_for_completion(&cc_go);
	if (!src || !dst || !fb || !kb) {
		w->err = -ENOMEM;
		w->why = "out of memory";
	}
	for (r = 0; !w->err && r < concurrent; r++) {
		if (atomic_inc_return(&cc_in_round) > 1)
			w->overlapped++;
		w->err = cc_round(w, r, src, dst, fb, kp);
		atomic_dec(&cc_in_round);
		w->rounds++;
	}
	dt_free(src, sp, sroom);
	dt_free(dst, dp, droom);
	dt_free(fb, fp, froom);
	dt_free(kb, kp, kroom);
	complete(&w->done);
	return 0;
}

/* Opens the disk named by `disk` and reads its reference; 0, or an error with *why set. */
static int cc_open_disk(struct file **file, struct page **ref, const char **why)
{
	struct device *dev = class_find_device_by_name(&block_class, disk);
	dev_t devt;
	int ret;

	if (!dev) {
		*why = "no such disk";
		return -ENODEV;
	}
	devt = dev->devt;
	put_device(dev);
	*file = bdev_file_open_by_dev(devt, BLK_OPEN_READ, NULL, NULL);
	if (IS_ERR(*file)) {
		ret = PTR_ERR(*file);
		*file = NULL;
		*why = "cannot open the disk";
		return ret;
	}
	cc_bdev = file_bdev(*file);
	*ref = alloc_pages(GFP_KERNEL, get_order(CC_DISK_PAGES * PAGE_SIZE));
	if (!*ref) {
		*why = "out of memory";
		return -ENOMEM;
	}
	cc_ref = page_address(*ref);
	ret = cc_read(*ref, 0, CC_DISK_PAGES);
	if (ret) {
		*why = "reading the reference failed";
		return ret;
	}
	if (vmm_all(cc_ref, 0, CC_DISK_PAGES * PAGE_SIZE)) {
		*why = "the reference is all zeros: a read could not be checked";
		return -EIO;
	}
	return 0;
}

/* Runs the concurrent suite; returns its number of failed cases. */
static unsigned int cc_run(void)
{
	unsigned int ncpu = num_online_cpus(), n = 0, failed = 0, overlapped = 0, i, cpu;
	struct cc_worker *ws = kcalloc(ncpu, sizeof(*ws), GFP_KERNEL);
	struct file *file = NULL;
	struct page *ref = NULL;
	const char *why = "";
	int err = 0;

	pr_info("KTAP version 1\n");
	pr_info("# vmm_dmatest_concurrent: %u CPUs, %u test devices (shared: %s), disk %s, rounds=%u\n",
		ncpu, ndts, dev_name(dts[0]->dev), *disk ? disk : "none", concurrent);
	pr_info("1..%u\n", ncpu + 1);
	if (!ws) {
		pr_info("not ok 1 start # out of memory\n");
		return 1;
	}
	if (*disk)
		err = cc_open_disk(&file, &ref, &why);
	if (err) {
		pr_info("not ok %u disk_reference # %s (%d)\n", ++n, why, err);
		failed++;
		cc_bdev = NULL;
	} else {
		pr_info("ok %u disk_reference%s\n", ++n, *disk ? "" : " # SKIP no disk= given");
	}

	i = 0;
	for_each_online_cpu(cpu) {
		struct cc_worker *w = &ws[i];
		struct task_struct *task;

		w->cpu = cpu;
		w->own = dts[i % ndts];
		w->shared = dts[0];
		w->why = "";
		init_completion(&w->done);
		task = kthread_run_on_cpu(cc_worker_fn, w, cpu, "vmm_dmatest/%u");
		if (IS_ERR(task)) {
			w->err = PTR_ERR(task);
			w->why = "kthread_run_on_cpu failed";
			complete(&w->done);
		}
		if (++i == ncpu)
			break;
	}
	complete_all(&cc_go);
	for (i = 0; i < ncpu; i++) {
		struct cc_worker *w = &ws[i];

		wait_for_completion(&w->done);
		w->own->maps += w->own_maps;
		w->own->unmaps += w->own_unmaps;
		w->shared->maps += w->shared_maps;
		w->shared->unmaps += w->shared_unmaps;
		overlapped += w->overlapped;
		pr_info("# concurrent: cpu%u own=%s rounds=%u overlapped=%u own_maps=%llu shared_maps=%llu disk_reads=%llu\n",
			w->cpu, dev_name(w->own->dev), w->rounds, w->overlapped, w->own_maps,
			w->shared_maps, w->disk_reads);
		if (w->err) {
			failed++;
			pr_info("not ok %u cpu%u # %s (%d) in round %u\n", ++n, w->cpu, w->why, w->err,
				w->rounds);
		} else {
			pr_info("ok %u cpu%u\n", ++n, w->cpu);
		}
	}
	pr_info("# concurrent: overlapped rounds=%u of %u\n", overlapped, ncpu * concurrent);
	for (i = 0; i < ndts; i++)
		pr_info("# totals: %s transfers=%llu bytes=%llu dma_maps=%llu dma_unmaps=%llu completed=%llu device_bytes=%llu\n",
			dev_name(dts[i]->dev), dts[i]->transfers, dts[i]->bytes, dts[i]->maps,
			dts[i]->unmaps, dt_r64(dts[i], REG_COMPLETED), dt_r64(dts[i], REG_BYTES));
	pr_info("# vmm_dmatest_concurrent: %u passed, %u failed\n", n - failed, failed);
	if (ref)
		__free_pages(ref, get_order(CC_DISK_PAGES * PAGE_SIZE));
	if (file)
		fput(file);
	cc_bdev = NULL;
	kfree(ws);
	return failed;
}

/*
 * The set of guest pages the devices wrote, by the suite's account: its size, then its
 * ranges of page frame numbers (first+count, hex) a few dozen to a line, for comparison with
 * the VMM's dirty log (--dirty-log-out).
 */
static void dt_print_written(void)
{
	unsigned long start = 0, end, pages = written ? bitmap_weight(written, written_bits) : 0;
	char line[900];
	int len = 0;

	pr_info("# written: pages=%lu\n", pages);
	if (!written)
		return;
	for (;;) {
		start = find_next_bit(written, written_bits, start);
		if (start >= written_bits)
			break;
		end = find_next_zero_bit(written, written_bits, start);
		len += scnprintf(line + len, sizeof(line) - len, " %lx+%lx", start, end - start);
		if (len > sizeof(line) - 40) {
			pr_info("# written ranges:%s\n", line);
			len = 0;
		}
		start = end;
	}
	if (len)
		pr_info("# written ranges:%s\n", line);
}

/*
 * After deferred probes (the virtio-iommu's endpoints probe late), and after the net suite
 * (vmm_nettest.o is linked first): run the suite on every DMA test device, print the pages
 * they wrote, and report (vmm_verdict.c ends the VM).
 */
/*
 * Waits for `hotplug` devices added after boot, one at a time, and runs the suite on each;
 * returns the failed cases (a device that never came is one).
 */
static unsigned int dt_run_hotplugged(void)
{
	unsigned int done = 0, failed = 0;
	struct dt *d;

	while (done < hotplug) {
		pr_info("# vmm_dmatest: waiting for hot-plugged device %u of %u\n", done + 1, hotplug);
		if (!wait_event_timeout(dt_hot_wait, READ_ONCE(dt_nhot), hotplug_wait * HZ)) {
			pr_info("KTAP version 1\n1..1\nnot ok 1 hotplug # no device came in %u s\n",
				hotplug_wait);
			return failed + 1;
		}
		mutex_lock(&dt_list_lock);
		d = dt_nhot ? dt_hot[0] : NULL;
		if (d)
			memmove(&dt_hot[0], &dt_hot[1], --dt_nhot * sizeof(d));
		mutex_unlock(&dt_list_lock);
		/* Ejected before its turn: wait again. */
		if (!d)
			continue;
		dt_run_suite(d);
		failed += d->failed;
		done++;
		pr_info("# vmm_dmatest: hot-plugged device %u of %u done (%s, %u failed)\n", done,
			hotplug, dev_name(d->dev), d->failed);
	}
	return failed;
}

static int __init dt_finish(void)
{
	unsigned int i, failed = 0;

	mutex_lock(&dt_list_lock);
	dt_booted = true;
	mutex_unlock(&dt_list_lock);
	if (!ndts && hotplug) {
		failed = dt_run_hotplugged();
		dt_print_written();
		vmm_tests_done("vmm_dmatest", failed, exit_vm);
		return 0;
	}
	if (!ndts) {
		if (!required)
			return 0;
		pr_info("KTAP version 1\n1..1\nnot ok 1 probe # no DMA test device found\n");
		vmm_tests_done("vmm_dmatest", 1, exit_vm);
		return 0;
	}
	for (i = 0; i < ndts; i++) {
		dt_run_suite(dts[i]);
		failed += dts[i]->failed;
	}
	if (concurrent)
		failed += cc_run();
	if (hotplug)
		failed += dt_run_hotplugged();
	dt_print_written();
	vmm_tests_done("vmm_dmatest", failed, exit_vm);
	return 0;
}
late_initcall_sync(dt_finish);

MODULE_DESCRIPTION("DMA test suite for the vmm project's DMA test device");
MODULE_LICENSE("GPL");
