// edgemoe accelerator top function: an M3ViT-style multi-task MoE ViT, one image per call.
// Written by edgemoe; the model's dimensions, types, tiles and DDR layout come from the
// generated edgemoe_config.h.
//
// Memory: `params` holds every dense tensor (trunk, all tasks' gates and heads), `pool` the
// expert slots the host filled (only the current task's experts, as many as the memory budget
// allows), `slots` maps (layer, expert) to a pool slot (-1: not resident). Activations stay on
// chip; `state` holds what the stepped protocol hands from one call to the next.
//
// Operations (`op`):
//   OP_FORWARD: the whole task in one call (Edge-MoE's mode): per MoE layer, gate, per-expert token
//     queues, the non-empty experts one after another with their weights streamed from the pool
//     in chunks through ping-pong buffers (the next chunk, of this expert or the next, loads while
//     the current one computes). Every routed expert must be resident. Returns 1.
//   OP_START: stem and blocks up to the first MoE layer's gate; routes go to `state`. Returns 0.
//   OP_EXPERT: apply expert `expert` of `layer` (pool slot `slot`) to its token queue. Returns 0.
//   OP_NEXT: finish MoE layer `layer` and run on to the next gate (returns 0) or through the head
//     to `output` (returns 1).
//   OP_PREGATE: the gate of `layer` on the current MoE input (pre-gating), into `state`. Returns 0.
// The stepped operations let the host keep fewer experts in DDR than the task uses: between
// gate and experts it loads the routed ones into the pool. Results are bit-identical to OP_FORWARD.
#include "edgemoe_top.h"

#include "edgemoe_config.h"
#include "edgemoe_kernels.h"

using namespace edgemoe;
using namespace cfg;

#ifndef __SYNTHESIS__
// C simulation only: 16-bit words read from the expert pool, per (layer, expert), and from params.
int64_t edgemoe_pool_words[MOE_LAYERS > 0 ? MOE_LAYERS : 1][EXPERTS];
#define COUNT_POOL(l, e, n) (edgemoe_pool_words[l][e] += (n))
#else
#define COUNT_POOL(l, e, n)
#endif

static act_t X[TOKENS][DIM];      // residual stream
static act_t HN[TOKENS][DIM];     // LayerNorm outputs (the MoE input between gate and experts)
static act_t QKV[TOKENS][3 * DIM];
static act_t ATT[TOKENS][DIM];
static act_t HID[TOKENS][HID_MAX];
static act_t Y[TOKENS][DIM];
static int64_t ACC[TOKENS][DIM];  // MoE output: sum over slots of expert output x probability
static int32_t RE[TOKENS * TOP_K], RP[TOKENS * TOP_K];

typedef typename acc_of<act_t, wt_t, EXP_HIDDEN + 1>::type yacc_t;
static yacc_t YACC[TOKENS][DIM];
// One expert chunk: EXP_CHUNK hidden units (rows of w1, entries of b1, rows of w2^T); two buffers.
static wt_t W1C[2][EXP_CHUNK][DIM], W2C[2][EXP_CHUNK][DIM];
static bias_t B1C[2][EXP_CHUNK];

static const int CHUNKS = (EXP_HIDDEN + EXP_CHUNK - 1) / EXP_CHUNK;

static void load_chunk(const int16_t *blob, int c, int buf, int layer, int expert) {
  for (int j = 0; j < EXP_CHUNK; j++) {
    int r = c * EXP_CHUNK + j;
    bool in = r < EXP_HIDDEN;
    B1C[buf][j] = in ? load<bias_t>(blob + EXP_B1, r) : bias_t(0);
    for (int d = 0; d < DIM; d++) {
#pragma HLS PIPELINE II = 1
      W1C[buf][j][d] = in ? load<wt_t>(blob + EXP_W1, r * DIM + d) : wt_t(0);
      W2C[buf][j][d] = in ? load<wt_t>(blob + EXP_W2, r * DIM + d) : wt_t(0);
    }
  }
  int rows = EXP_HIDDEN - c * EXP_CHUNK < EXP_CHUNK ? EXP_HIDDEN - c * EXP_CHUNK : EXP_CHUNK;
  COUNT_POOL(layer, expert, rows * (2 * DIM + 1));
}

// One chunk of an expert on its queue: HID = gelu(x . w1c^T + b1c); YACC += HID . w2c.
static void compute_chunk(int c, int buf, const int *queue, int nq) {
  typedef typename acc_of<act_t, wt_t, DIM + 1>::type hacc_t;
  int rows = EXP_HIDDEN - c * EXP_CHUNK < EXP_CHUNK ? EXP_HIDDEN - c * EXP_CHUNK : EXP_CHUNK;
  for (int q = 0; q < nq; q++) {
    int t = queue[q];
    for (int j = 0; j < rows; j++) {
#pragma HLS PIPELINE II = 1
      hacc_t a = B1C[buf][j];
      for (int d = 0; d < DIM; d++) a += HN[t][d] * W1C[buf][j][d];
      HID[q][j] = gelu<act_t, GELU_RANGE, GELU_STEP>(act_t(a), GELU_LUT);
    }
    for (int d = 0; d < DIM; d++)
      for (int j = 0; j < rows; j++) YACC[q][d] += HID[q][j] * W2C[buf][j][d];
  }
}

// The expert's output for its queue, weighted by each token's gate probability, into ACC.
static void finish_expert(const int *queue, const int *slot_of, int nq) {
  for (int q = 0; q < nq; q++) {
    int t = queue[q];
    int64_t p = RP[t * TOP_K + slot_of[q]];
    for (int d = 0; d < DIM; d++) {
      act_t y = YACC[q][d];
      ACC[t][d] += to_raw(y) * p;
    }
  }
}

static void start_expert(const int16_t *blob, int nq, int layer, int expert) {
  static bias_t b2[DIM];
  for (int d = 0; d < DIM; d++) b2[d] = load<bias_t>(blob + EXP_B2, d);  // read once per expert
  COUNT_POOL(layer, expert, DIM);
  for (int q = 0; q < nq; q++)
    for (int d = 0; d < DIM; d++) YACC[q][d] = b2[d];
}

// Tokens routed to `expert` (ascending), with the top-k slot that chose it.
static int queue_of(int expert, int *queue, int *slot_of) {
  int nq = 0;
  for (int t = 0; t < TOKENS; t++)
    for (int k = 0; k < TOP_K; k++)
      if (RE[t * TOP_K + k] == expert) {
        queue[nq] = t;
        slot_of[nq] = k;
        nq++;
      }
  return nq;
}

static void run_expert(const int16_t *blob, int layer, int expert, const int *queue, const int *slot_of, int nq) {
  start_expert(blob, nq, layer, expert);
  int ping = 0;
  load_chunk(blob, 0, ping, layer, expert);
  for (int c = 0; c < CHUNKS; c++) {
    if (c + 1 < CHUNKS) load_chunk(blob, c + 1, ping ^ 1, layer, expert);  // overlaps the compute below
    compute_chunk(c, ping, queue, nq);
    ping ^= 1;
  }
  finish_expert(queue, slot_of, nq);
}

// All routed experts of a layer, in ascending order, chunks streamed through the ping-pong buffers.
static int run_layer_experts(int layer, const int16_t *pool, const int32_t *slots) {
  static int queue[TOKENS * TOP_K], slot_of[TOKENS * TOP_K];
  for (int e = 0; e < EXPERTS; e++) {
    int nq = queue_of(e, queue, slot_of);
    if (nq == 0) continue;  // only non-empty experts are fetched and computed
    int s = slots[layer * EXPERTS + e];
    if (s < 0) return -2;
    run_expert(pool + (int64_t)s * EXPERT_WORDS, layer, e, queue, slot_of, nq);
  }
  return 0;
}

static void clear_acc() {
  for (int t = 0; t < TOKENS; t++)
    for (int d = 0; d < DIM; d++) ACC[t][d] = 0;
}

// The attention half of block b: X += proj(attention(qkv(LN1(X)))), then HN = LN2(X).
static void attend(int b, const int16_t *params) {
  layernorm<DIM, act_t, norm_t, LN_SHIFT, LN_GUARD, RSTD_FRAC>(X, TOKENS, params + OFF_LN1_G[b], params + OFF_LN1_B[b],
                                                             EPS_LN1[b], HN);
  linear<DIM, 3 * DIM, TOKENS, TILE_IN, TILE_OUT, act_t, wt_t, abias_t, act_t>(HN, TOKENS, params + OFF_QKV_W[b],
                                                                            params + OFF_QKV_B[b], QKV);
  attention<DIM, HEADS, TOKENS, ATTN_PAR, act_t, score_t, QK_SHIFT, SCALE_SHIFT, PROB_FRAC>(QKV, TOKENS, ATT, EXP2_LUT);
  linear<DIM, DIM, TOKENS, TILE_IN, TILE_OUT, act_t, wt_t, abias_t, act_t>(ATT, TOKENS, params + OFF_PROJ_W[b],
                                                                        params + OFF_PROJ_B[b], Y);
  for (int t = 0; t < TOKENS; t++)
    for (int d = 0; d < DIM; d++) X[t][d] = act_t(X[t][d] + Y[t][d]);
  layernorm<DIM, act_t, norm_t, LN_SHIFT, LN_GUARD, RSTD_FRAC>(X, TOKENS, params + OFF_LN2_G[b], params + OFF_LN2_B[b],
                                                             EPS_LN2[b], HN);
}

static void dense_mlp(int b, const int16_t *params) {
  linear<DIM, HID_MAX, TOKENS, TILE_IN, TILE_OUT, act_t, wt_t, bias_t, act_t>(HN, TOKENS, params + OFF_FC1_W[b],
                                                                            params + OFF_FC1_B[b], HID, MLP, DIM);
  for (int t = 0; t < TOKENS; t++)
    for (int j = 0; j < MLP; j++) HID[t][j] = gelu<act_t, GELU_RANGE, GELU_STEP>(HID[t][j], GELU_LUT);
  linear<HID_MAX, DIM, TOKENS, TILE_IN, TILE_OUT, act_t, wt_t, bias_t, act_t>(HID, TOKENS, params + OFF_FC2_W[b],
                                                                            params + OFF_FC2_B[b], Y, DIM, MLP);
  for (int t = 0; t < TOKENS; t++)
    for (int d = 0; d < DIM; d++) X[t][d] = act_t(X[t][d] + Y[t][d]);
}

static void gate_of(int task, int layer, const int16_t *params, int32_t *ids, int32_t *probs) {
  gate<DIM, EXPERTS, TOP_K, TOKENS, TILE_IN, TILE_OUT, act_t, wt_t, bias_t, score_t, PROB_FRAC>(
      HN, TOKENS, params + OFF_GATE_W[task][layer], params + OFF_GATE_B[task][layer], WINDOW[task][layer],
      KEEP[task][layer], ids, probs, EXP2_LUT);
}

// X += MoE output (the combined experts of the layer just computed).
static void add_moe() {
  const int FA = act_t::width - act_t::iwidth;
  for (int t = 0; t < TOKENS; t++)
    for (int d = 0; d < DIM; d++) {
      act_t m = convert_raw<FA + PROB_FRAC, act_t>(ACC[t][d]);
      X[t][d] = act_t(X[t][d] + m);
    }
}

// Run blocks from `b` (its attention half first). Stepped: stop after the next MoE block's gate
// and return its layer. Forward: compute its experts and go on. Returns -1 past the last block,
// -2 when a routed expert is not resident (forward).
static int run_blocks(int b, int task, const int16_t *params, const int16_t *pool, const int32_t *slots,
                      int32_t *state, bool forward) {
  for (; b < DEPTH; b++) {
    attend(b, params);
    int layer = MOE_LAYER_OF[b];
    if (layer < 0) {
      dense_mlp(b, params);
      continue;
    }
    gate_of(task, layer, params, RE, RP);
    for (int i = 0; i < TOKENS * TOP_K; i++) {
      state[ST_RE + layer * TOKENS * TOP_K + i] = RE[i];
      state[ST_RP + layer * TOKENS * TOP_K + i] = RP[i];
    }
    clear_acc();
    if (!forward) return layer;
    if (run_layer_experts(layer, pool, slots) < 0) return -2;
    add_moe();
  }
  return -1;
}

static void stem(const int32_t *input, const int16_t *params, int32_t *state) {
  run_stem(input, params, state + ST_FMAP0, state + ST_FMAP1);  // generated: the model's stem stages
  const int32_t *fmap = STEM_OUT_IN_FMAP1 ? state + ST_FMAP1 : state + ST_FMAP0;
  for (int d = 0; d < DIM; d++) {
    act_t cls = OFF_CLS >= 0 ? load<act_t>(params + OFF_CLS, d) : act_t(0);
    X[0][d] = act_t(cls + load<act_t>(params + OFF_POS, d));
  }
  for (int p = 0; p < TOKENS - 1; p++)
    for (int d = 0; d < DIM; d++)
      X[1 + p][d] = act_t(from_raw<act_t>(fmap[d * (TOKENS - 1) + p]) + load<act_t>(params + OFF_POS, (1 + p) * DIM + d));
}

// Final norm, then the task's head (LayerNorm + linear + pixel shuffle) or the backbone tokens.
static void head(int task, const int16_t *params, int32_t *output) {
  if (FINAL_NORM) {
    layernorm<DIM, act_t, norm_t, LN_SHIFT, LN_GUARD, RSTD_FRAC>(X, TOKENS, params + OFF_NORM_G, params + OFF_NORM_B,
                                                               EPS_NORM, X);
  }
  int ch = HEAD_CH[task];
  if (ch == 0) {
    for (int t = 0; t < TOKENS; t++)
      for (int d = 0; d < DIM; d++) output[t * DIM + d] = (int32_t)to_raw(X[t][d]);
    return;
  }
  layernorm<DIM, act_t, norm_t, LN_SHIFT, LN_GUARD, RSTD_FRAC>(&X[1], TOKENS - 1, params + OFF_HEAD_LN_G[task],
                                                             params + OFF_HEAD_LN_B[task], EPS_HEAD[task], HN);
  // Output features in tiles of HID_MAX: feature f = (py * PATCH + px) * ch + c of token gy * GRID_W + gx.
  const int out = ch * PATCH * PATCH;
  for (int f0 = 0; f0 < out; f0 += HID_MAX) {
    int nf = out - f0 < HID_MAX ? out - f0 : HID_MAX;
    linear<DIM, HID_MAX, TOKENS, TILE_IN, TILE_OUT, act_t, wt_t, bias_t, act_t>(
        HN, TOKENS - 1, params + OFF_HEAD_W[task] + (int64_t)f0 * DIM, params + OFF_HEAD_B[task] + f0, HID, nf, DIM);
    for (int p = 0; p < TOKENS - 1; p++)
      for (int j = 0; j < nf; j++) {
        int f = f0 + j, c = f % ch, px = (f / ch) % PATCH, py = f / ch / PATCH;
        int gy = p / GRID_W, gx = p % GRID_W;
        output[(c * IMG_H + gy * PATCH + py) * IMG_W + gx * PATCH + px] = (int32_t)to_raw(HID[p][j]);
      }
  }
}

static void save(int32_t *state, bool acc) {
  for (int t = 0; t < TOKENS; t++)
    for (int d = 0; d < DIM; d++) {
      state[ST_X + t * DIM + d] = (int32_t)to_raw(X[t][d]);
      state[ST_H + t * DIM + d] = (int32_t)to_raw(HN[t][d]);
      if (acc) {
        state[ST_ACC + 2 * (t * DIM + d)] = (int32_t)(uint32_t)(uint64_t)ACC[t][d];
        state[ST_ACC + 2 * (t * DIM + d) + 1] = (int32_t)(ACC[t][d] >> 32);
      }
    }
}

static void restore(const int32_t *state, bool x, bool acc) {
  for (int t = 0; t < TOKENS; t++)
    for (int d = 0; d < DIM; d++) {
      if (x) X[t][d] = from_raw<act_t>(state[ST_X + t * DIM + d]);
      HN[t][d] = from_raw<act_t>(state[ST_H + t * DIM + d]);
      if (acc) {
        uint64_t lo = (uint32_t)state[ST_ACC + 2 * (t * DIM + d)];
        int64_t hi = state[ST_ACC + 2 * (t * DIM + d) + 1];
        ACC[t][d] = (int64_t)((uint64_t)(hi << 32) | lo);
      }
    }
}

static void restore_routes(const int32_t *state, int layer) {
  for (int i = 0; i < TOKENS * TOP_K; i++) {
    RE[i] = state[ST_RE + layer * TOKENS * TOP_K + i];
    RP[i] = state[ST_RP + layer * TOKENS * TOP_K + i];
  }
}

int edgemoe_top(int op, int task, int layer, int expert, int slot, const int16_t *params, const int16_t *pool,
                const int32_t *slots, const int32_t *input, int32_t *output, int32_t *state) {
#pragma HLS INTERFACE m_axi port = params offset = slave bundle = gmem0 max_widen_bitwidth = 256
#pragma HLS INTERFACE m_axi port = pool offset = slave bundle = gmem1 max_widen_bitwidth = 256
#pragma HLS INTERFACE m_axi port = slots offset = slave bundle = gmem2
#pragma HLS INTERFACE m_axi port = input offset = slave bundle = gmem2
#pragma HLS INTERFACE m_axi port = output offset = slave bundle = gmem2
#pragma HLS INTERFACE m_axi port = state offset = slave bundle = gmem2
#pragma HLS INTERFACE s_axilite port = op
#pragma HLS INTERFACE s_axilite port = task
#pragma HLS INTERFACE s_axilite port = layer
#pragma HLS INTERFACE s_axilite port = expert
#pragma HLS INTERFACE s_axilite port = slot
#pragma HLS INTERFACE s_axilite port = return
  if (task < 0 || task >= TASKS) return -1;
  if (op == OP_FORWARD || op == OP_START) {
    stem(input, params, state);
    int r = run_blocks(0, task, params, pool, slots, state, op == OP_FORWARD);
    if (r == -2) return -2;
    if (r >= 0) {
      save(state, true);
      return 0;
    }
    head(task, params, output);
    return 1;
  }
  if (layer < 0 || layer >= MOE_LAYERS) return -1;
  if (op == OP_EXPERT) {
    if (expert < 0 || expert >= EXPERTS || slot < 0) return -1;
    static int queue[TOKENS * TOP_K], slot_of[TOKENS * TOP_K];
    restore_routes(state, layer);
    restore(state, false, true);
    int nq = queue_of(expert, queue, slot_of);
    if (nq) run_expert(pool + (int64_t)slot * EXPERT_WORDS, layer, expert, queue, slot_of, nq);
    for (int t = 0; t < TOKENS; t++)
      for (int d = 0; d < DIM; d++) {
        state[ST_ACC + 2 * (t * DIM + d)] = (int32_t)(uint32_t)(uint64_t)ACC[t][d];
        state[ST_ACC + 2 * (t * DIM + d) + 1] = (int32_t)(ACC[t][d] >> 32);
      }
    return 0;
  }
  if (op == OP_PREGATE) {
    restore(state, false, false);
    gate_of(task, layer, params, state + ST_PE, state + ST_PP);
    return 0;
  }
  if (op == OP_NEXT) {
    restore(state, true, true);
    add_moe();
    int r = run_blocks(MOE_BLOCK[layer] + 1, task, params, pool, slots, state, false);
    if (r >= 0) {
      save(state, true);
      return 0;
    }
    head(task, params, output);
    return 1;
  }
  return -1;
}
