// SPDX-License-Identifier: Apache-2.0
// The initramfs's /init: says that user space runs, then powers the VM off.
// Built with -nostdlib -static, so it needs nothing but the kernel.
//
// On PVM-based KVM hosts guest user space cannot run (the first syscall faults): the kernel
// then panics with "Attempted to kill init!", and `panic=1 reboot=k` ends the VM.

#define SYS_write 1
#define SYS_reboot 169
#define LINUX_REBOOT_MAGIC1 0xfee1dead
#define LINUX_REBOOT_MAGIC2 672274793
#define LINUX_REBOOT_CMD_POWER_OFF 0x4321fedc

static long sys3(long n, long a, long b, long c)
{
	long ret;
	__asm__ volatile("syscall" : "=a"(ret) : "a"(n), "D"(a), "S"(b), "d"(c) : "rcx", "r11", "memory");
	return ret;
}

static long sys4(long n, long a, long b, long c, long d)
{
	long ret;
	register long r10 __asm__("r10") = d;
	__asm__ volatile("syscall" : "=a"(ret) : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10) : "rcx", "r11", "memory");
	return ret;
}

void _start(void)
{
	static const char msg[] = "vmm-init: user space is running, powering off\n";
	sys3(SYS_write, 1, (long)msg, sizeof(msg) - 1);
	sys4(SYS_reboot, LINUX_REBOOT_MAGIC1, LINUX_REBOOT_MAGIC2, LINUX_REBOOT_CMD_POWER_OFF, 0);
	for (;;)
		;
}
