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
 */

#include <linux/bitmap.h>
#include <linux/completion.h>
#include <linux/delay.h>
#include <linux/dma-mapping.h>
#include <linux/interrupt.h>
#include <linux/io.h>
#include <linux/iommu.h>
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

struct dt {
	struct pci_dev *pdev;
	struct device *dev;
	void __iomem *bar;
	bool iommu;
	bool lazy;
	int irq;
	struct completion done;
	unsigned long irqs;
	/* The suite's own account of its traffic, to compare with the VMM's counters. */
	u64 transfers, bytes, maps, unmaps;
	unsigned int n, failed, skipped;
};

#define MAX_DEVICES 8
static struct dt *dts[MAX_DEVICES];
static unsigned int ndts;
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
 * reaches the IOMMU when the flush queue is flushed (10 ms), so the test waits for it.
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
	if (d->lazy)
		msleep(100);
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
	if (ndts == MAX_DEVICES)
		return -ENOSPC;
	d->irq = -1;
	if (pci_alloc_irq_vectors(pdev, 1, 1, PCI_IRQ_MSIX) == 1) {
		d->irq = pci_irq_vector(pdev, 0);
		if (devm_request_irq(d->dev, d->irq, dt_irq, 0, "vmm_dmatest", d))
			d->irq = -1;
	}
	dev_info(d->dev, "DMA test device, completion %s\n", d->irq >= 0 ? "by MSI-X" : "polled");
	dts[ndts++] = d;
	return 0;
}

static const struct pci_device_id dt_ids[] = {
	{ PCI_DEVICE(DT_VENDOR, DT_DEVICE) },
	{ }
};

static struct pci_driver dt_driver = {
	.name = "vmm_dmatest",
	.id_table = dt_ids,
	.probe = dt_probe,
};

static int __init dt_init(void)
{
	return pci_register_driver(&dt_driver);
}
device_initcall(dt_init);

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
static int __init dt_finish(void)
{
	unsigned int i, failed = 0;

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
	dt_print_written();
	vmm_tests_done("vmm_dmatest", failed, exit_vm);
	return 0;
}
late_initcall_sync(dt_finish);

MODULE_DESCRIPTION("DMA test suite for the vmm project's DMA test device");
MODULE_LICENSE("GPL");
