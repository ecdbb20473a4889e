// C simulation entry points for ctypes (edgemoe's fpga executor, C-sim driver): the top function
// plus the DDR read counters of the simulation. Not part of the synthesized design.
#include <string.h>

#include "edgemoe_config.h"
#include "edgemoe_top.h"

extern int64_t edgemoe_pool_words[cfg::MOE_LAYERS > 0 ? cfg::MOE_LAYERS : 1][cfg::EXPERTS];

extern "C" {

int edgemoe_csim_call(int op, int task, int layer, int expert, int slot, const int16_t *params, const int16_t *pool,
                      const int32_t *slots, const int32_t *input, int32_t *output, int32_t *state) {
  return edgemoe_top(op, task, layer, expert, slot, params, pool, slots, input, output, state);
}

// Words read from the expert pool since the last reset, per (layer, expert), row-major.
void edgemoe_csim_pool_words(int64_t *out) { memcpy(out, edgemoe_pool_words, sizeof(edgemoe_pool_words)); }

void edgemoe_csim_reset_counters(void) { memset(edgemoe_pool_words, 0, sizeof(edgemoe_pool_words)); }

// What this library was built for: state words, expert words, params words, tokens, dim (a check
// that the bundle and the library agree before any call).
void edgemoe_csim_info(int64_t *out) {
  out[0] = cfg::ST_WORDS;
  out[1] = cfg::EXPERT_WORDS;
  out[2] = cfg::PARAMS_WORDS;
  out[3] = cfg::TOKENS;
  out[4] = cfg::DIM;
}
}
