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

/* Starts a raw deflate stream at a block boundary: `nbits` (< 8) bits of `bits`
 * come before the next input byte, `dict` is the window (may be empty). */
int snapfs_isal_start(struct inflate_state *s, const uint8_t *dict, uint32_t dict_len,
                      uint8_t bits, int32_t nbits) {
    inflate_reset(s);
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
 * deflate stream ended (its final block done). */
int snapfs_isal_step(struct inflate_state *s, const uint8_t *in, uint32_t in_len,
                     uint8_t *out, uint32_t out_len, uint32_t *consumed, uint32_t *produced,
                     int *finished) {
    s->next_in = (uint8_t *)in;
    s->avail_in = in_len;
    s->next_out = out;
    s->avail_out = out_len;
    int r = inflate_run(s);
    *consumed = in_len - s->avail_in;
    *produced = out_len - s->avail_out;
    *finished = s->block_state == ISAL_BLOCK_FINISH;
    return r;
}
