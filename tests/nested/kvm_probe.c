// kvm-probe: runs inside a guest of the nested harness (a Linux guest under QEMU TCG with
// -cpu max, which emulates AMD-V, and the kit's kvm modules loaded) and proves that /dev/kvm
// there runs guest code: it creates a VM with one vCPU in real mode whose code writes 0x42 to
// port 0x10 and halts, and prints each exit. Statically linked, like the agent.
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>

static int fail(const char* what) {
  perror(what);
  return 1;
}

int main(void) {
  int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
  if (kvm < 0) return fail("open /dev/kvm");
  printf("api %d\n", ioctl(kvm, KVM_GET_API_VERSION, 0));
  int vm = ioctl(kvm, KVM_CREATE_VM, 0);
  if (vm < 0) return fail("KVM_CREATE_VM");
  unsigned char* memory = mmap(NULL, 0x10000, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (memory == MAP_FAILED) return fail("mmap");
  const unsigned char code[] = {0xb0, 0x42, 0xe6, 0x10, 0xf4};  // mov al, 0x42; out 0x10, al; hlt
  memcpy(memory + 0x1000, code, sizeof code);
  struct kvm_userspace_memory_region region = {
      .slot = 0, .guest_phys_addr = 0, .memory_size = 0x10000, .userspace_addr = (unsigned long)memory};
  if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0) return fail("KVM_SET_USER_MEMORY_REGION");
  int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
  if (vcpu < 0) return fail("KVM_CREATE_VCPU");
  int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
  struct kvm_run* run = mmap(NULL, (size_t)run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
  if (run == MAP_FAILED) return fail("mmap kvm_run");
  struct kvm_sregs sregs;
  if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0) return fail("KVM_GET_SREGS");
  sregs.cs.base = 0;
  sregs.cs.selector = 0;
  if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0) return fail("KVM_SET_SREGS");
  struct kvm_regs regs = {.rip = 0x1000, .rflags = 2};
  if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0) return fail("KVM_SET_REGS");
  for (;;) {
    if (ioctl(vcpu, KVM_RUN, 0) < 0) return fail("KVM_RUN");
    if (run->exit_reason == KVM_EXIT_IO) {
      printf("io port %#x value %#x\n", run->io.port, *((unsigned char*)run + run->io.data_offset));
    } else if (run->exit_reason == KVM_EXIT_HLT) {
      printf("hlt\n");
      return 0;
    } else {
      printf("unexpected exit %u\n", run->exit_reason);
      return 1;
    }
  }
}
