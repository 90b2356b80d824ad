/* Entry of the deltavm micro guest. The VMM starts it in 64-bit ring 0 with paging on, the boot
 * GDT loaded and %rdi pointing at its parameters (src/backends/kvm/x86_boot.h). It leaves ring 0
 * at once: iretq to ring 3 with IOPL 3, so that the workload reports over port I/O without
 * ever running ring-0 code (which is emulated, and slow, under software nested virtualisation).
 */
        .section .text.start, "ax"
        .code64
        .globl _start
_start:
        jmp     1f
        .balign 8
        .ascii  "DVMICRO1"              /* The VMM checks this before loading the program. */
1:
        leaq    user_stack_top(%rip), %rax
        pushq   $0x23                   /* SS: user data selector. */
        pushq   %rax                    /* RSP. */
        pushq   $0x3002                 /* RFLAGS: IOPL 3, interrupts off. */
        pushq   $0x2b                   /* CS: user 64-bit code selector. */
        leaq    micro_main(%rip), %rax
        pushq   %rax                    /* RIP; %rdi still holds the parameters. */
        iretq

        .bss
        .balign 16
user_stack:
        .skip   16384
user_stack_top:

        .section .note.GNU-stack, "", @progbits
