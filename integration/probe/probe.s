# clockcarry probe guest: reports, on every vCPU, the guest TSC together
# with the kvm-clock page (PVTI) it belongs to, read under the pvclock
# version protocol.
#
# Built as a PVH ELF (ELF64 with a Xen note of type 18,
# XEN_ELFNOTE_PHYS32_ENTRY): any VMM that boots PVH kernels (Cloud
# Hypervisor, QEMU's -kernel, the reference VMM) starts it in 32-bit
# protected mode, paging off, flat segments, interrupts off.
#
# Assembled with GNU as (`as --64`, code in `.code32`) and linked with
# probe.ld by integration/refvmm/build.rs. GNU as, Intel syntax.
#
# Per vCPU:
#   1. index = initial APIC ID (CPUID.1:EBX[31:24]) mod MAX_VCPUS;
#   2. its own stack, PVTI slot and report record;
#   3. wrmsr MSR_KVM_SYSTEM_TIME_NEW = PVTI slot | 1 (enable kvm-clock);
#   4. ask the VMM for the reference VMM's magic (`in eax, REPORT_PORT`):
#      - port mode (reference VMM): each report is a 64-byte record in guest
#        memory; `out REPORT_PORT, eax` hands its address to the VMM, which
#        stamps it with host CLOCK_TAI. No pacing in the guest: the VMM
#        paces by sleeping between exits.
#      - text mode (any other VMM): each report is one line on COM1,
#        "CC <vcpu> <seq> <tsc> <version> <tsc_timestamp> <system_time>
#        <mul> <shift> <flags>" in fixed-width lower-case hex, then a busy
#        wait of PACE_CYCLES TSC cycles.
#   5. loop: read the PVTI version (spin while odd), lfence, rdtsc, copy the
#      PVTI fields, lfence, re-read the version; retry if it changed.
#
# Record layout (little endian), REPORT_AREA + index * 64:
#   0 u32 magic RECORD_MAGIC   4 u32 vcpu    8 u64 seq     16 u64 tsc
#  24 u32 pvti version        28 u32 0      32 u64 tsc_timestamp
#  40 u64 system_time         48 u32 tsc_to_system_mul
#  52 i8 tsc_shift            53 u8 flags   54..63 zero
#
# Debug port 0x80 gets 0x01 on entry and 0x02 once kvm-clock is enabled.

        .intel_syntax noprefix

        .equ MSR_KVM_SYSTEM_TIME_NEW, 0x4b564d01
        .equ REPORT_PORT, 0x0cc0
        .equ REF_MAGIC, 0x4b434350      # what the reference VMM answers on REPORT_PORT
        .equ RECORD_MAGIC, 0x31524343   # "CCR1"
        .equ COM1, 0x3f8
        .equ DEBUG_PORT, 0x80
        .equ MAX_VCPUS, 64
        .equ SLOT_SHIFT, 6              # 64-byte PVTI slots and records
        .equ STACK_SHIFT, 10            # 1 KiB stacks
        .equ PACE_CYCLES, 0x01000000    # text mode: ~6 ms at 2.6 GHz between lines

# ---------------------------------------------------------------------------
# The PVH entry note: name "Xen", type 18, descriptor = 32-bit entry point.
        .section .note.Xen, "a", @note
        .p2align 2
        .long 4                         # namesz ("Xen\0")
        .long 4                         # descsz
        .long 18                        # XEN_ELFNOTE_PHYS32_ENTRY
        .asciz "Xen"
        .long _start

# ---------------------------------------------------------------------------
        .text
        .code32
        .globl _start
_start:
        cli
        cld
        mov al, 0x01
        out DEBUG_PORT, al

        # ebp = vCPU index, kept for the whole program.
        mov eax, 1
        xor ecx, ecx
        cpuid
        shr ebx, 24
        and ebx, MAX_VCPUS - 1
        mov ebp, ebx

        # esp = top of this vCPU's stack.
        lea eax, [ebp + 1]
        shl eax, STACK_SHIFT
        lea esp, [eax + stacks]

        # edi = this vCPU's PVTI slot, esi = its report record.
        mov eax, ebp
        shl eax, SLOT_SHIFT
        lea edi, [eax + pvti_area]
        lea esi, [eax + report_area]

        # Record header: magic and vCPU index, written once.
        mov dword ptr [esi + 0], RECORD_MAGIC
        mov [esi + 4], ebp

        # Enable kvm-clock: MSR_KVM_SYSTEM_TIME_NEW = gpa | 1.
        mov eax, edi
        or eax, 1
        xor edx, edx
        mov ecx, MSR_KVM_SYSTEM_TIME_NEW
        wrmsr
        mov al, 0x02
        out DEBUG_PORT, al

        # Port mode when the reference VMM answers its magic.
        mov dx, REPORT_PORT
        in eax, dx
        cmp eax, REF_MAGIC
        sete al
        mov [ebp + modes], al

        call print_banner

# ---------------------------------------------------------------------------
report_loop:
        mov ecx, [edi]                  # PVTI version
        test ecx, 1
        jnz update_in_progress
        lfence
        rdtsc
        mov [esi + 16], eax
        mov [esi + 20], edx
        mov eax, [edi + 8]              # tsc_timestamp
        mov [esi + 32], eax
        mov eax, [edi + 12]
        mov [esi + 36], eax
        mov eax, [edi + 16]             # system_time
        mov [esi + 40], eax
        mov eax, [edi + 20]
        mov [esi + 44], eax
        mov eax, [edi + 24]             # tsc_to_system_mul
        mov [esi + 48], eax
        mov ax, [edi + 28]              # tsc_shift, flags
        mov [esi + 52], ax
        lfence
        cmp ecx, [edi]
        jne report_loop                 # the page changed under us: retry
        mov [esi + 24], ecx
        add dword ptr [esi + 8], 1      # seq += 1 (64-bit)
        adc dword ptr [esi + 12], 0

        cmp byte ptr [ebp + modes], 0
        je text_report
        mov eax, esi                    # port mode: hand the record to the VMM
        mov dx, REPORT_PORT
        out dx, eax
        jmp report_loop

update_in_progress:
        pause
        jmp report_loop

text_report:
        call lock_serial
        mov al, 'C'
        call putc
        mov al, 'C'
        call putc
        mov eax, ebp
        call put_sp_hex8
        mov eax, [esi + 8]              # seq, low 32 bits
        call put_sp_hex8
        mov ebx, 16                     # tsc
        call put_sp_field64
        mov eax, [esi + 24]             # version
        call put_sp_hex8
        mov ebx, 32                     # tsc_timestamp
        call put_sp_field64
        mov ebx, 40                     # system_time
        call put_sp_field64
        mov eax, [esi + 48]             # mul
        call put_sp_hex8
        movzx eax, byte ptr [esi + 52]  # shift
        call put_sp_hex2
        movzx eax, byte ptr [esi + 53]  # flags
        call put_sp_hex2
        mov al, '\n'
        call putc
        call unlock_serial

        rdtsc                           # pace: wait PACE_CYCLES
        mov ebx, eax
pace:
        pause
        rdtsc
        sub eax, ebx
        cmp eax, PACE_CYCLES
        jb pace
        jmp report_loop

# ---------------------------------------------------------------------------
# COM1 helpers. putc: al -> COM1. Clobbers edx.
putc:
        mov dx, COM1
        out dx, al
        ret

# put_sp_hex8: " " then eax as 8 hex digits. Clobbers eax, ecx, edx.
put_sp_hex8:
        push eax
        mov al, ' '
        call putc
        pop eax
        mov ecx, 8
        jmp put_hex

# put_sp_hex2: " " then al as 2 hex digits. Clobbers eax, ecx, edx.
put_sp_hex2:
        push eax
        mov al, ' '
        call putc
        pop eax
        shl eax, 24
        mov ecx, 2
        jmp put_hex

# put_sp_field64: " " then the u64 at [esi + ebx] as 16 hex digits.
put_sp_field64:
        mov eax, [esi + ebx + 4]
        call put_sp_hex8
        mov eax, [esi + ebx]
        mov ecx, 8
        jmp put_hex

# put_hex: the top ecx nibbles of eax, most significant first.
put_hex:
        rol eax, 4
        push eax
        and eax, 0x0f
        mov al, [eax + hex_digits]
        call putc
        pop eax
        dec ecx
        jnz put_hex
        ret

# print_banner: "clockcarry-probe 1 vcpu <idx> <port|text>\n" on COM1.
print_banner:
        call lock_serial
        mov ebx, offset banner
        call puts
        mov eax, ebp
        call put_sp_hex2
        mov ebx, offset mode_text
        cmp byte ptr [ebp + modes], 0
        je 1f
        mov ebx, offset mode_port
1:
        call puts
        call unlock_serial
        ret

# puts: the NUL-terminated string at ebx. Clobbers eax, ebx, edx.
puts:
        mov al, [ebx]
        test al, al
        jz 1f
        call putc
        inc ebx
        jmp puts
1:
        ret

# One vCPU prints a line at a time.
lock_serial:
        mov al, 1
1:
        xchg al, [serial_lock]
        test al, al
        jz 2f
        pause
        mov al, 1
        jmp 1b
2:
        ret

unlock_serial:
        mov byte ptr [serial_lock], 0
        ret

# ---------------------------------------------------------------------------
        .section .rodata
hex_digits:
        .ascii "0123456789abcdef"
banner:
        .asciz "clockcarry-probe 1 vcpu"
mode_port:
        .asciz " port\n"
mode_text:
        .asciz " text\n"

# ---------------------------------------------------------------------------
        .bss
        .p2align 6
pvti_area:
        .skip MAX_VCPUS << SLOT_SHIFT
report_area:
        .skip MAX_VCPUS << SLOT_SHIFT
modes:
        .skip MAX_VCPUS
serial_lock:
        .skip 4
        .p2align 4
stacks:
        .skip MAX_VCPUS << STACK_SHIFT
