"""Why no load-time re-layout of the packed fp4 nibbles gives a two-instruction e2m1 -> f16x2 conversion.

An e2m1 code (sign s, magnitude bits e1 e0 m) is exactly value * 2^-14 as fp16 when s sits at bit 15 and
e1 e0 m at bits 11..9 with every other bit 0 (e1 e0 become the exponent's low bits, m the mantissa's top
bit; code 1 = 0.5 lands on fp16's subnormal 2^-15). An f16x2 register therefore needs the 8 bit positions
P = {9, 10, 11, 15, 25, 26, 27, 31}. If the nibbles were stored so that each of the four registers that one
32-bit word of 8 codes makes were `(word >> d) & mask` (one shift, one AND; `mask` is then P itself), the
four sets P + d would partition the word's 32 bits. This script checks every choice of shifts, plain or
rotating, in one word or across a word pair (64 bits, funnel shifts), and the same for bf16 (s at 15, the
magnitude at 8..6): none exists. So at least one register of every four needs a second shift and a merge,
which is no better than the e4m3 cvt path that kernels._FP4_F16_ASM takes (7 integer ops + 4 cvt per 8
values), and both still need the 4 scale multiplies.

    python bench/fp4_conversion_bound.py
"""
FP16 = (9, 10, 11, 15)  # bit positions of one half: magnitude e1 e0 m, then the sign
BF16 = (6, 7, 8, 15)


def partitions(half, bits, rotate):
    """All sets of shifts whose translates of an f16x2 register's 8 positions partition range(bits)
    (backtracking: the lowest bit not yet covered must be covered by some translate)."""
    pattern = [b + 16 * h for h in range(2) for b in half]
    found = []

    def place(cover, shifts):
        if len(cover) == bits:
            found.append(tuple(sorted(shifts)))
            return
        low = min(set(range(bits)) - cover)
        for p in pattern:  # the translate that puts pattern bit p on `low`
            d = low - p
            moved = {(q + d) % bits for q in pattern} if rotate else {q + d for q in pattern}
            if not rotate and not all(0 <= m < bits for m in moved):
                continue
            if not cover & moved:
                place(cover | moved, shifts + [d % bits if rotate else d])

    place(set(), [])
    return sorted(set(found))


def main():
    for name, half in (("fp16", FP16), ("bf16", BF16)):
        for bits in (32, 64):
            for rotate in (False, True):
                sols = partitions(half, bits, rotate)
                how = "rotating" if rotate else "plain"
                print(f"{name}: {bits // 8} registers from {bits} bits, {how} shifts: "
                      f"{len(sols)} layouts with one shift and one mask per register")


if __name__ == "__main__":
    main()
