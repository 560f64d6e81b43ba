/* snapfs: a thin C shim over ISA-L's raw-deflate inflate (igzip), so that Rust never
 * depends on the layout of `struct inflate_state`. libisal itself is loaded at run
 * time (dlopen, see isal.rs), so the binary starts without it and a cold mount does
 * not read it; the shim calls it through the pointers bound here. Built only when
 * Debian's libisal-dev header is present (see build.rs). */
#include <stdint.h>
#include <stdlib.h>
#include <isa-l/igzip_lib.h>

static void (*inflate_init)(struct inflate_state *);
static void (*inflate_reset)(struct inflate_state *);
static int (*inflate_set_dict)(struct inflate_state *, uint8_t *, uint32_t);
static int (*inflate_run)(struct inflate_state *);

/* Binds libisal's isal_inflate_init, isal_inflate_reset, isal_inflate_set_dict and
 * isal_inflate (once, before any other call). */
void snapfs_isal_bind(void *init, void *reset, void *set_dict, void *run) {
    inflate_init = (void (*)(struct inflate_state *))init;
    inflate_reset = (void (*)(struct inflate_state *))reset;
    inflate_set_dict = (int (*)(struct inflate_state *, uint8_t *, uint32_t))set_dict;
    inflate_run = (int (*)(struct inflate_state *))run;
}

struct inflate_state *snapfs_isal_new(void) {
    struct inflate_state *s = malloc(sizeof *s);
    if (s)
        inflate_init(s);
    return s;
}

void snapfs_isal_free(struct inflate_state *s) { free(s); }

/* Starts a stream. `gzip`: a gzip member whose header, CRC and length ISA-L checks.
 * Otherwise raw deflate resuming at a block boundary: `nbits` (< 8) bits of `bits`
 * come before the next input byte, `dict` is the window (may be empty). */
int snapfs_isal_start(struct inflate_state *s, int32_t gzip, const uint8_t *dict,
                      uint32_t dict_len, uint8_t bits, int32_t nbits) {
    inflate_reset(s);
    if (gzip) {
        s->crc_flag = ISAL_GZIP;
        return 0;
    }
    s->crc_flag = ISAL_DEFLATE;
    if (dict_len) {
        int r = inflate_set_dict(s, (uint8_t *)dict, dict_len);
        if (r != COMP_OK)
            return r;
    }
    s->read_in = bits;
    s->read_in_length = nbits;
    return 0;
}

/* One call of isal_inflate; reports what it consumed and produced, and whether the
 * stream ended (its final block out and, for gzip, its trailer checked). When the
 * stream ends, the whole bytes ISA-L had read ahead go back, and those an earlier
 * call reported as consumed come out as `given_back`. */
int snapfs_isal_step(struct inflate_state *s, const uint8_t *in, uint32_t in_len,
                     uint8_t *out, uint32_t out_len, uint32_t *consumed, uint32_t *given_back,
                     uint32_t *produced, int *finished) {
    s->next_in = (uint8_t *)in;
    s->avail_in = in_len;
    s->next_out = out;
    s->avail_out = out_len;
    int r = inflate_run(s);
    int64_t moved = (int64_t)in_len - (int64_t)s->avail_in;
    if (s->block_state == ISAL_BLOCK_FINISH && s->read_in_length >= 8) {
        /* ISA-L before 2.31 keeps the read-ahead bytes at the end of a raw stream. */
        moved -= s->read_in_length / 8;
        s->read_in_length = 0;
        s->read_in = 0;
    }
    *consumed = moved > 0 ? (uint32_t)moved : 0;
    *given_back = moved < 0 ? (uint32_t)-moved : 0;
    *produced = out_len - s->avail_out;
    *finished = s->block_state == ISAL_BLOCK_FINISH;
    return r;
}
