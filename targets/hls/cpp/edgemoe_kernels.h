// edgemoe HLS kernel library: the units of an M3ViT-style MoE ViT accelerator, as templates over
// dimensions and fixed-point types (one library for every model size; the bundle's generated
// edgemoe_config.h instantiates it). Written by edgemoe; synthesizable with Vitis HLS, and
// simulated with plain g++ and the open ap_types headers.
//
// Arithmetic contract (the numpy emulator in edgemoe/targets/hls/emulate.py follows it bit for
// bit): products and sums are exact; every conversion to a storage type rounds half up (AP_RND)
// and saturates (AP_SAT); nonlinear units (LayerNorm, exp, GELU) work on raw integers with the
// same rounding helpers.
#ifndef EDGEMOE_KERNELS_H
#define EDGEMOE_KERNELS_H

#include <ap_fixed.h>
#include <ap_int.h>
#include <stdint.h>

namespace edgemoe {

// ---- raw values --------------------------------------------------------------------------------
template <class T> struct raw_of;
template <int W, int I, ap_q_mode Q, ap_o_mode O, int N> struct raw_of<ap_fixed<W, I, Q, O, N> > {
  typedef ap_int<W> type;
};
template <int W, int I, ap_q_mode Q, ap_o_mode O, int N> struct raw_of<ap_ufixed<W, I, Q, O, N> > {
  typedef ap_uint<W> type;
};

// The two's-complement (or unsigned) integer behind a fixed-point value.
template <class T> inline int64_t to_raw(const T &v) {
  typename raw_of<T>::type r = v.range(T::width - 1, 0);
  return r.to_int64();
}

// A fixed-point value from its raw integer (the low T::width bits).
template <class T> inline T from_raw(int64_t r) {
  T v;
  v.range(T::width - 1, 0) = (ap_int<64>)r;
  return v;
}

// Assign a raw int64 with F fraction bits to type T: ap_fixed's own rounding and saturation.
template <int F, class T> inline T convert_raw(int64_t v) {
  ap_fixed<64, 64 - F> wide = from_raw<ap_fixed<64, 64 - F> >(v);
  return T(wide);
}

// Words of the DDR images: 16-bit values as stored, 32-bit ones as (low, high) pairs.
template <class T> inline T load(const int16_t *p, int i) {
  if (T::width > 16) {
    int64_t lo = (uint16_t)p[2 * i], hi = (int16_t)p[2 * i + 1];
    return from_raw<T>(lo | (hi << 16));
  }
  return from_raw<T>((int64_t)p[i]);
}

inline int64_t round_shift(int64_t v, int s) {
  if (s <= 0) return v << (-s);
  return (v + ((int64_t)1 << (s - 1))) >> s;
}

// Division rounding down (C++ '/' truncates towards zero).
inline int64_t floor_div(int64_t a, int64_t b) {
  int64_t q = a / b;
  if ((a % b != 0) && ((a < 0) != (b < 0))) q -= 1;
  return q;
}

inline int64_t round_div(int64_t a, int64_t b) { return floor_div(2 * a + b, 2 * b); }

inline int64_t isqrt(int64_t v) {
  uint64_t x = (uint64_t)v, r = 0, bit = (uint64_t)1 << 62;
  while (bit > x) bit >>= 2;
  while (bit) {
    if (x >= r + bit) {
      x -= r + bit;
      r = (r >> 1) + bit;
    } else {
      r >>= 1;
    }
    bit >>= 2;
  }
  return (int64_t)r;
}

template <int A, int B> struct max_of { enum { value = A > B ? A : B }; };

// Accumulator of sum_{K} x*w (+ bias): exact for every input.
template <class TX, class TW, int K> struct acc_of {
  enum {
    F = (TX::width - TX::iwidth) + (TW::width - TW::iwidth),
    I = TX::iwidth + TW::iwidth + 2 + (K > 1 ? 32 - __builtin_clz(K - 1) : 0),
  };
  typedef ap_fixed<I + F, I> type;
};

// ---- the shared linear unit ---------------------------------------------------------------------
// y[n][0:out] = x[n][0:in] . W[out][in]^T + b, W streamed from DDR in TO x TI tiles into a
// ping-pong buffer (the next tile loads while the current one computes); every weight is read
// once per call. x (row stride XS >= in) and y (row stride YS >= out) are on-chip.
template <int XS, int YS, int NMAX, int TI, int TO, class TX, class TW, class TB, class TY>
void linear(const TX x[][XS], int n, const int16_t *w, const int16_t *b, TY y[][YS], int out = YS, int in = XS) {
  typedef typename acc_of<TX, TW, XS + 1>::type acc_t;
  static acc_t acc[NMAX][TO];
  TW tile[2][TO][TI];
#pragma HLS ARRAY_PARTITION variable = tile complete dim = 2
#pragma HLS ARRAY_PARTITION variable = tile complete dim = 3
#pragma HLS ARRAY_PARTITION variable = acc complete dim = 2
  for (int o0 = 0; o0 < out; o0 += TO) {
    for (int t = 0; t < n; t++)
      for (int o = 0; o < TO; o++) acc[t][o] = (o0 + o < out) ? acc_t(load<TB>(b, o0 + o)) : acc_t(0);
    int ping = 0;
    for (int i0 = 0; i0 < in; i0 += TI) {
    load_tile:
      for (int o = 0; o < TO; o++)
        for (int i = 0; i < TI; i++) {
#pragma HLS PIPELINE II = 1
          bool inside = (o0 + o < out) && (i0 + i < in);
          tile[ping][o][i] = inside ? load<TW>(w, (int64_t)(o0 + o) * in + i0 + i) : TW(0);
        }
    mac:
      for (int t = 0; t < n; t++) {
#pragma HLS PIPELINE II = 1
        for (int o = 0; o < TO; o++)
          for (int i = 0; i < TI; i++)
            if (i0 + i < in) acc[t][o] += x[t][i0 + i] * tile[ping][o][i];
      }
      ping ^= 1;
    }
    for (int t = 0; t < n; t++)
      for (int o = 0; o < TO; o++)
        if (o0 + o < out) y[t][o0 + o] = acc[t][o];
  }
}

// ---- convolution (stem) on the linear unit's structure ------------------------------------------
// in: (CIN, H, W) raw values of TX; out: (COUT, HO, WO) activations (raw). Output channels in
// tiles of TO: the tile's weights (TO x CIN*K*K) are read into an on-chip buffer once, then every
// output pixel reduces its CIN*K*K window TI products at a time.
template <int CIN, int COUT, int H, int W, int K, int S, int P, int TI, int TO, class TX, class TW, class TB, class TY>
void conv2d(const int32_t *in, int32_t *out, const int16_t *w, const int16_t *b, bool relu) {
  const int HO = (H + 2 * P - K) / S + 1, WO = (W + 2 * P - K) / S + 1, R = CIN * K * K;
  typedef typename acc_of<TX, TW, R + 1>::type acc_t;
  static TW wbuf[TO][R];
  TB bias[TO];
#pragma HLS ARRAY_PARTITION variable = wbuf complete dim = 1
  for (int co0 = 0; co0 < COUT; co0 += TO) {
    for (int o = 0; o < TO; o++) {
      bias[o] = co0 + o < COUT ? load<TB>(b, co0 + o) : TB(0);
      for (int r = 0; r < R; r++) wbuf[o][r] = co0 + o < COUT ? load<TW>(w, (co0 + o) * R + r) : TW(0);
    }
    for (int oy = 0; oy < HO; oy++)
      for (int ox = 0; ox < WO; ox++) {
        acc_t acc[TO];
        for (int o = 0; o < TO; o++) acc[o] = bias[o];
        for (int r0 = 0; r0 < R; r0 += TI) {
#pragma HLS PIPELINE II = 1
          for (int r = r0; r < r0 + TI && r < R; r++) {
            int ci = r / (K * K), ky = (r / K) % K, kx = r % K;
            int iy = oy * S - P + ky, ix = ox * S - P + kx;
            if (iy < 0 || iy >= H || ix < 0 || ix >= W) continue;
            TX v = from_raw<TX>(in[(ci * H + iy) * W + ix]);
            for (int o = 0; o < TO; o++) acc[o] += v * wbuf[o][r];
          }
        }
        for (int o = 0; o < TO && co0 + o < COUT; o++) {
          TY v = acc[o];
          if (relu && v < 0) v = 0;
          out[((co0 + o) * HO + oy) * WO + ox] = (int32_t)to_raw(v);
        }
      }
  }
}

// ---- LayerNorm over D: integer mean, variance, isqrt and reciprocal (see the emulator) ----------
template <int D, class TA, class TN, int LN_SHIFT, int LN_GUARD, int RSTD_FRAC>
void layernorm(const TA x[][D], int n, const int16_t *g, const int16_t *b, int64_t eps_raw, TA y[][D]) {
  const int FA = TA::width - TA::iwidth, FN = TN::width - TN::iwidth, FS = FA - LN_SHIFT;
  for (int t = 0; t < n; t++) {
    int64_t s1 = 0;
    for (int i = 0; i < D; i++) s1 += to_raw(x[t][i]);
    int64_t mean = round_div(s1, D), s2 = 0;
    for (int i = 0; i < D; i++) {
      int64_t cs = round_shift(to_raw(x[t][i]) - mean, LN_SHIFT);
      s2 += cs * cs;
    }
    int64_t var = round_div(s2, D) + eps_raw;
    int64_t sd = isqrt(var << (2 * LN_GUARD));
    int64_t rstd = floor_div((int64_t)1 << (RSTD_FRAC + FS + LN_GUARD), sd);
    for (int i = 0; i < D; i++) {
#pragma HLS PIPELINE II = 1
      TA nrm = convert_raw<FA + RSTD_FRAC, TA>((to_raw(x[t][i]) - mean) * rstd);
      int64_t v = to_raw(nrm) * to_raw(load<TN>(g, i)) + (to_raw(load<TN>(b, i)) << FA);
      y[t][i] = convert_raw<FA + FN, TA>(v);
    }
  }
}

// ---- GELU by table: GELU_N entries at -RANGE + j / 2^STEP, linear interpolation -----------------
template <class TA, int RANGE, int STEP> inline TA gelu(TA x, const int32_t *lut) {
  const int FA = TA::width - TA::iwidth;
  int64_t lo = (int64_t)RANGE << FA, u = to_raw(x) + lo;
  if (u < 0) return TA(0);
  if (u >= 2 * lo) return x;
  int64_t j = u >> (FA - STEP), t = u & (((int64_t)1 << (FA - STEP)) - 1);
  int64_t v = (int64_t)lut[j] + round_shift(((int64_t)lut[j + 1] - lut[j]) * t, FA - STEP);
  return convert_raw<FA, TA>(v);
}

// ---- exp(z), z <= 0 raw with ZF fraction bits, to a probability with PF fraction bits -------------
template <int ZF, int PF> inline int64_t exp_unit(int64_t z, const int64_t *exp2_lut) {
  const int64_t cut = (int64_t)24 << ZF;  // exp(-24) rounds to 0 at any PF <= 16
  if (z < -cut) return 0;
  int64_t u = round_shift(z * (int64_t)24204406, ZF + 24 - 16);  // log2(e) with 24 fraction bits
  int64_t n = u >> 16, f = u & 0xFFFF;
  int64_t j = f >> 8, t = f & 0xFF;
  int64_t val = exp2_lut[j] + round_shift((exp2_lut[j + 1] - exp2_lut[j]) * t, 8);
  int sh = (int)(30 - PF - n);
  return (val + ((int64_t)1 << (sh - 1))) >> sh;
}

// ---- multi-head attention, single pass (online softmax) over the keys ----------------------------
// qkv: (n, 3D) activations [q heads | k heads | v heads]; out: (n, D). q, k, v enter 24-bit
// multipliers (QK_SHIFT bits dropped); scores are rounded to TS; for each query the keys stream by
// once with a running max, a running sum and a running numerator rescaled when the max grows.
template <int D, int HEADS, int NMAX, int PAR, class TA, class TS, int QK_SHIFT, int SCALE_SHIFT, int PF>
void attention(const TA qkv[][3 * D], int n, TA out[][D], const int64_t *exp2_lut) {
  const int HD = D / HEADS, FA = TA::width - TA::iwidth, FS = TS::width - TS::iwidth;
  const int FQ = FA - QK_SHIFT;
  const int64_t one = (int64_t)1 << PF;
  static int64_t kbuf[NMAX][HD], vbuf[NMAX][HD];
#pragma HLS ARRAY_PARTITION variable = kbuf cyclic factor = PAR dim = 2
#pragma HLS ARRAY_PARTITION variable = vbuf cyclic factor = PAR dim = 2
  for (int h = 0; h < HEADS; h++) {
    for (int j = 0; j < n; j++)
      for (int d = 0; d < HD; d++) {
        kbuf[j][d] = round_shift(to_raw(qkv[j][D + h * HD + d]), QK_SHIFT);
        vbuf[j][d] = round_shift(to_raw(qkv[j][2 * D + h * HD + d]), QK_SHIFT);
      }
    for (int i = 0; i < n; i++) {
      int64_t q[HD], acc[HD];
#pragma HLS ARRAY_PARTITION variable = q cyclic factor = PAR
#pragma HLS ARRAY_PARTITION variable = acc cyclic factor = PAR
      for (int d = 0; d < HD; d++) q[d] = round_shift(to_raw(qkv[i][h * HD + d]), QK_SHIFT);
      int64_t m = 0, l = 0;
    keys:
      for (int j = 0; j < n; j++) {
#pragma HLS PIPELINE
        int64_t dot = 0;
        for (int d = 0; d < HD; d++) dot += q[d] * kbuf[j][d];
        int64_t s = to_raw(convert_raw<2 * FQ + (SCALE_SHIFT > 0 ? SCALE_SHIFT : 0), TS>(dot));
        if (j == 0) {
          m = s;
          l = one;
          for (int d = 0; d < HD; d++) acc[d] = vbuf[0][d] << PF;
          continue;
        }
        int64_t diff = s > m ? s - m : m - s;
        int64_t e = exp_unit<FS, PF>(-diff, exp2_lut);
        if (s > m) {
          l = round_shift(l * e, PF) + one;
          for (int d = 0; d < HD; d++) acc[d] = round_shift(acc[d] * e, PF) + (vbuf[j][d] << PF);
          m = s;
        } else {
          l += e;
          for (int d = 0; d < HD; d++) acc[d] += e * vbuf[j][d];
        }
      }
      for (int d = 0; d < HD; d++) out[i][h * HD + d] = convert_raw<FA, TA>(round_div(acc[d] << QK_SHIFT, l));
    }
  }
}

// ---- gate: logits, softmax over the task's window, top-k over its kept experts ------------------
// Writes, per token, TOPK expert ids (descending logit, ties to the lower id) and their
// probabilities (PF fraction bits).
template <int D, int E, int TOPK, int NMAX, int TI, int TO, class TA, class TW, class TB, class TS, int PF>
void gate(const TA x[][D], int n, const int16_t *w, const int16_t *b, uint64_t window, uint64_t keep,
          int32_t *ids, int32_t *probs, const int64_t *exp2_lut) {
  const int FS = TS::width - TS::iwidth;
  static TS logits[NMAX][E];
  linear<D, E, NMAX, TI, TO, TA, TW, TB, TS>(x, n, w, b, logits);
  for (int t = 0; t < n; t++) {
    int64_t mx = 0;
    bool any = false;
    for (int e = 0; e < E; e++)
      if ((window >> e) & 1) {
        int64_t v = to_raw(logits[t][e]);
        if (!any || v > mx) mx = v;
        any = true;
      }
    int64_t ex[E], total = 0;
    for (int e = 0; e < E; e++) {
      ex[e] = ((window >> e) & 1) ? exp_unit<FS, PF>(to_raw(logits[t][e]) - mx, exp2_lut) : 0;
      total += ex[e];
    }
    uint64_t taken = 0;
    for (int k = 0; k < TOPK; k++) {  // online top-k: k passes of an argmax over the kept experts
      int best = -1;
      int64_t bv = 0;
      for (int e = 0; e < E; e++) {
        if (!((keep >> e) & 1) || ((taken >> e) & 1)) continue;
        int64_t v = to_raw(logits[t][e]);
        if (best < 0 || v > bv) {
          best = e;
          bv = v;
        }
      }
      taken |= (uint64_t)1 << best;
      ids[t * TOPK + k] = best;
      probs[t * TOPK + k] = (int32_t)round_div(ex[best] << PF, total);
    }
  }
}

}  // namespace edgemoe

#endif
