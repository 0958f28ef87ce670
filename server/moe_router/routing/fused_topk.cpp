// The top-k family's inference routing as two CPU ops, a Python extension module (pybind11:
// a call costs about 2 us less than through torch.ops, and releases the GIL while it runs).
// topk_route: the whole route, gate matmul included, one token row after another;
// topk_select: the selection from gate logits another gate computed. See fused_topk.py for
// when the routers use them and why.
//
// Shapes: T tokens, D hidden size, E experts, G groups, k = top_k.
//
//     logits[t, e] = sum_d x[t, d] * w[e, d] (+ b[e])         [T, E] fp32 (topk_route)
//     scores[t]    = softmax(logits[t]) | sigmoid(logits[t])  [T, E]
//     choice[t]    = scores[t] (+ bias) | logits[t] + bias    [T, E]
//                    then, with G > 1, the experts of all but the kept_groups best groups
//                    (by best choice, or the sum of the best two) set to -inf or 0
//     indices[t]   = the k largest choices, largest first,    [T, k] int32
//                    equal values in index order (a stable descending sort's order)
//     weights[t]   = scores[t, indices[t]]                    [T, k] fp32
//                    / (sum + eps, or sum when eps is 0)      if renormalize
//                    * scale                                  if scale != 1
//     counts[e]    = how many of the T * k slots chose e      [E] int64
//     bounded      = every |logits[t, e]| < bound (NaN never is)   bool
//     load[e]     += counts[e]   (atomically), when a load tensor is given
//
// Every row is computed by the same code in the same order whatever the other rows are
// and however the rows are split between threads or tiles (the dot products keep 16
// partial sums per expert, added pairwise at the end), so a token's answer never depends
// on its batch mates or on the intra-op thread count.

#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <new>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

constexpr int kLanes = 16;   // partial sums per dot product: two AVX2 / one AVX-512 register
constexpr int kExperts = 4;  // experts per pass over a row: each x value feeds four of them

// The 16 lanes of a dot product held as kParts vectors of kWidth floats (GCC and Clang
// vector extensions): one AVX-512 register, or two AVX2 ones. kRows rows of x are
// multiplied at once, each gate value loaded once for all of them: as many as the
// registers hold accumulators for (kRows x kExperts x 16 lanes). AVX-512's 32 registers
// hold six rows (24 accumulators, 4 gate vectors, 1 of x): ten loads feed 24 multiply-adds
// where four rows needed eight for 16, and the loads from L2 set the pace (DeepSeek-V3's
// gate at 256 tokens: 9.4 -> 8.6 ms against four rows; five rows by five experts: 8.7).
// With AVX2's sixteen registers it is one row (two spilled: 1.1-1.2x slower than one).
#if defined(__AVX512F__)
constexpr int kWidth = 16;
constexpr int kRows = 6;
#else
constexpr int kWidth = 8;
constexpr int kRows = 1;
#endif
constexpr int kParts = kLanes / kWidth;
constexpr uintptr_t kAlignment = 64;  // bytes: a cache line, and one AVX-512 load
constexpr int64_t kPassesToCopy = 4;   // x_rows: passes over a tile that pay for its copy
typedef float Vec __attribute__((vector_size(kWidth * sizeof(float))));

inline Vec load_vec(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// out[t * stride + r] = the dot product of row t < R of x [R, D] with gate row r < N of
// w [N, D]: in lane j the products of the columns i = j (mod 16) added in increasing i,
// then the 16 lanes added pairwise (8, 4, 2, 1 apart). The order depends on D alone, so
// neither R nor N nor the row's batch mates change a bit.
template <int R, int N>
inline void dot_block(const float* x, const float* w, int64_t d, float* out, int64_t stride) {
  Vec acc[R][N][kParts] = {};
  int64_t i = 0;
  for (; i + kLanes <= d; i += kLanes) {
    for (int p = 0; p < kParts; ++p) {
      Vec wv[N];
      for (int r = 0; r < N; ++r) wv[r] = load_vec(w + r * d + i + p * kWidth);
      for (int t = 0; t < R; ++t) {
        const Vec xv = load_vec(x + t * d + i + p * kWidth);
        for (int r = 0; r < N; ++r) acc[t][r][p] += xv * wv[r];
      }
    }
  }
  for (int t = 0; t < R; ++t) {
    for (int r = 0; r < N; ++r) {
      float lanes[kLanes];
      std::memcpy(lanes, acc[t][r], sizeof lanes);
      for (int j = 0; i + j < d; ++j) lanes[j] += x[t * d + i + j] * w[r * d + i + j];
      for (int width = kLanes / 2; width > 0; width /= 2) {
        for (int j = 0; j < width; ++j) lanes[j] += lanes[j + width];
      }
      out[t * stride + r] = lanes[0];
    }
  }
}

// logits [rows, E] (stride E) of rows x [rows, D] with N gate rows w [N, D], kRows rows
// at a time.
template <int N>
void block_logits(const float* x, const float* w, int64_t rows, int64_t d, int64_t e,
                  float* logits) {
  int64_t t = 0;
  for (; t + kRows <= rows; t += kRows) dot_block<kRows, N>(x + t * d, w, d, logits + t * e, e);
  switch (rows - t) {
    case 5: dot_block<5, N>(x + t * d, w, d, logits + t * e, e); break;
    case 4: dot_block<4, N>(x + t * d, w, d, logits + t * e, e); break;
    case 3: dot_block<3, N>(x + t * d, w, d, logits + t * e, e); break;
    case 2: dot_block<2, N>(x + t * d, w, d, logits + t * e, e); break;
    case 1: dot_block<1, N>(x + t * d, w, d, logits + t * e, e); break;
    default: break;
  }
}

// logits [rows, E] of a tile of rows x [rows, D] through the gate w [E, D]: the gate read
// in blocks of kExperts rows, each block for every row of the tile before the next, so a
// gate larger than the core's cache (DeepSeek-V3's 7 MB) is read from memory once per
// tile rather than once per token.
void tile_logits(const float* x, const float* w, int64_t rows, int64_t d, int64_t e,
                 float* logits) {
  int64_t first = 0;
  for (; first + kExperts <= e; first += kExperts) {
    block_logits<kExperts>(x, w + first * d, rows, d, e, logits + first);
  }
  switch (e - first) {
    case 3: block_logits<3>(x, w + first * d, rows, d, e, logits + first); break;
    case 2: block_logits<2>(x, w + first * d, rows, d, e, logits + first); break;
    case 1: block_logits<1>(x, w + first * d, rows, d, e, logits + first); break;
    default: break;
  }
}

// probs [E] = softmax(logits [E]): exp(l - max) / sum.
inline void row_softmax(const float* logits, int64_t e, float* probs) {
  float top = logits[0];
  for (int64_t i = 1; i < e; ++i) top = logits[i] > top ? logits[i] : top;
  float total = 0.0f;
  for (int64_t i = 0; i < e; ++i) {
    probs[i] = std::exp(logits[i] - top);
    total += probs[i];
  }
  for (int64_t i = 0; i < e; ++i) probs[i] /= total;
}

// The k largest of probs [E] into indices/values [k], largest first; an equal value
// never passes one already kept, so ties go to the lower index (scan in index order).
inline void row_top_k(const float* probs, int64_t e, int64_t k, int32_t* indices,
                      float* values) {
  int64_t kept = 0;
  for (int64_t i = 0; i < e; ++i) {
    const float v = probs[i];
    if (kept == k && !(v > values[k - 1])) continue;
    int64_t at = kept < k ? kept++ : k - 1;
    while (at > 0 && v > values[at - 1]) {
      values[at] = values[at - 1];
      indices[at] = indices[at - 1];
      --at;
    }
    values[at] = v;
    indices[at] = static_cast<int32_t>(i);
  }
}

// Whether every logit of a row is finite and below ``bound`` in magnitude (NaN fails the
// comparison): what the server would otherwise check on the answer, for free here.
inline bool row_bounded(const float* logits, int64_t e, double bound) {
  bool bounded = true;
  for (int64_t i = 0; i < e; ++i) bounded &= std::fabs(static_cast<double>(logits[i])) < bound;
  return bounded;
}

// counts [E] int64: how many of the rows * k chosen indices name each expert; and
// num_per_token [T] int32, k each. Filled here rather than by at::zeros / at::full: two
// dispatches less.
std::pair<at::Tensor, at::Tensor> tally(const int32_t* indices, int64_t rows, int64_t k,
                                        int64_t e, const at::TensorOptions& options) {
  at::Tensor counts = at::empty({e}, options.dtype(at::kLong));
  int64_t* c = counts.mutable_data_ptr<int64_t>();
  std::fill(c, c + e, int64_t{0});
  for (int64_t i = 0; i < rows * k; ++i) c[indices[i]] += 1;
  at::Tensor per_token = at::empty({rows}, options.dtype(at::kInt));
  int32_t* per = per_token.mutable_data_ptr<int32_t>();
  std::fill(per, per + rows, static_cast<int32_t>(k));
  return {counts, per_token};
}

// ---------------------------------------------------------------------------------------
// The selection alone, from gate logits already computed (any gate: the batch-invariant
// matmul, a gate bias, logit transforms), for the top-k family with a correction bias,
// sigmoid scores or expert groups (DeepSeek-V2/V3, Ernie, MiniMax, ...):
//
//     scores   = softmax(logits) | sigmoid(logits)                         [T, E]
//     choice   = scores (+ bias) | logits + bias      (bias_on_logits)     [T, E]
//     groups   = G groups of E/G consecutive experts, scored by their best choice (max)
//                or the sum of their best two (top2_sum); the topk_group best kept,
//                ties to the lower group; the others' experts get -inf or 0 (fill)
//     indices  = top-k of choice, ties to the lower index                  [T, k]
//     weights  = scores[indices], renormalised (eps) and scaled as above   [T, k]

enum GroupScore : int64_t { kMax = 0, kTop2Sum = 1 };

struct SelectOptions {
  int64_t e, k, groups, kept_groups, group_score;
  bool sigmoid, bias_on_logits, fill_zero, renormalize;
  float eps, scale;
};

void select_row(const float* logits, const float* bias, const SelectOptions& o,
                float* scores, float* choice, int32_t* indices, float* weights,
                float* values) {
  const int64_t e = o.e;
  if (o.sigmoid) {
    for (int64_t i = 0; i < e; ++i) scores[i] = 1.0f / (1.0f + std::exp(-logits[i]));
  } else {
    row_softmax(logits, e, scores);
  }
  for (int64_t i = 0; i < e; ++i) {
    const float base = o.bias_on_logits ? logits[i] : scores[i];
    choice[i] = bias != nullptr ? base + bias[i] : base;
  }
  if (o.groups > 1) {
    const int64_t size = e / o.groups;
    float group_scores[64];  // G <= 64, checked by the caller
    for (int64_t g = 0; g < o.groups; ++g) {
      const float* member = choice + g * size;
      float first = member[0], second = -INFINITY;
      for (int64_t i = 1; i < size; ++i) {
        if (member[i] > first) {
          second = first;
          first = member[i];
        } else if (member[i] > second) {
          second = member[i];
        }
      }
      group_scores[g] = o.group_score == kTop2Sum ? first + second : first;
    }
    int32_t kept[64];
    float kept_values[64];
    row_top_k(group_scores, o.groups, o.kept_groups, kept, kept_values);
    bool keep[64] = {};
    for (int64_t j = 0; j < o.kept_groups; ++j) keep[kept[j]] = true;
    const float fill = o.fill_zero ? 0.0f : -INFINITY;
    for (int64_t g = 0; g < o.groups; ++g) {
      if (keep[g]) continue;
      for (int64_t i = g * size; i < (g + 1) * size; ++i) choice[i] = fill;
    }
  }
  row_top_k(choice, e, o.k, indices, values);
  float total = 0.0f;
  for (int64_t j = 0; j < o.k; ++j) {
    weights[j] = scores[indices[j]];
    total += weights[j];
  }
  if (o.renormalize) {
    const float denominator = o.eps != 0.0f ? total + o.eps : total;
    for (int64_t j = 0; j < o.k; ++j) weights[j] /= denominator;
  }
  if (o.scale != 1.0f) {
    for (int64_t j = 0; j < o.k; ++j) weights[j] *= o.scale;
  }
}

const float* bias_data(const c10::optional<at::Tensor>& bias, int64_t e, const char* name) {
  if (!bias.has_value() || !bias->defined()) return nullptr;
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == e && bias->is_contiguous() &&
                  bias->device().is_cpu() && bias->scalar_type() == at::kFloat,
              name, ": expected a contiguous float32 CPU [E] tensor");
  return bias->const_data_ptr<float>();
}

SelectOptions select_options(int64_t e, int64_t k, bool sigmoid, bool bias_on_logits,
                             int64_t groups, int64_t kept_groups, int64_t group_score,
                             bool fill_zero, bool renormalize, double eps, double scale) {
  TORCH_CHECK(k >= 1 && k <= e, "k: expected 1..E");
  TORCH_CHECK(groups >= 1 && groups <= 64 && e % groups == 0, "groups: expected 1..64 dividing E");
  TORCH_CHECK(kept_groups >= 1 && kept_groups <= groups, "kept_groups: expected 1..groups");
  return SelectOptions{e, k, groups, kept_groups, group_score, sigmoid, bias_on_logits,
                       fill_zero, renormalize, static_cast<float>(eps),
                       static_cast<float>(scale)};
}

std::tuple<std::vector<at::Tensor>, bool> topk_select(
    const at::Tensor& logits, const c10::optional<at::Tensor>& bias, int64_t k, bool sigmoid,
    bool bias_on_logits, int64_t groups, int64_t kept_groups, int64_t group_score,
    bool fill_zero, bool renormalize, double eps, double scale, double bound) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous() &&
                  logits.scalar_type() == at::kFloat,
              "logits: expected a contiguous float32 [T, E] tensor");
  const int64_t rows = logits.size(0), e = logits.size(1);
  const SelectOptions o = select_options(e, k, sigmoid, bias_on_logits, groups, kept_groups,
                                         group_score, fill_zero, renormalize, eps, scale);
  const float* b = bias_data(bias, e, "bias");
  const auto f32 = logits.options();
  at::Tensor scores = at::empty({rows, e}, f32);
  at::Tensor indices = at::empty({rows, k}, f32.dtype(at::kInt));
  at::Tensor weights = at::empty({rows, k}, f32);
  const float* l = logits.const_data_ptr<float>();
  float* sc = scores.mutable_data_ptr<float>();
  int32_t* ix = indices.mutable_data_ptr<int32_t>();
  float* wt = weights.mutable_data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 4096 / e);
  std::atomic<bool> all_bounded{true};
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(static_cast<size_t>(e + k));
    bool bounded = true;
    for (int64_t t = begin; t < end; ++t) {
      bounded &= row_bounded(l + t * e, e, bound);
      select_row(l + t * e, b, o, sc + t * e, scratch.data(), ix + t * k, wt + t * k,
                 scratch.data() + e);
    }
    if (!bounded) all_bounded.store(false, std::memory_order_relaxed);
  });
  auto [counts, per_token] = tally(ix, rows, k, e, f32);
  return {{indices, weights, per_token, counts, scores}, all_bounded.load()};
}

// ---------------------------------------------------------------------------------------
// The whole route, gate matmul included: the logits of a tile of rows (tile_logits; the
// tiling changes no bit), then each row's selection as topk_select makes it.

// A tile's rows of x: half the core's L2 (the other half holds the gate block being read),
// at most kMaxTileRows rows. Each tile reads the whole gate once, so the tile sets how
// often a gate larger than the L2 (DeepSeek-V3's 7 MB) comes from memory: at 256 tokens
// of 7168, 256 KiB tiles (9 rows) read it 29 times, 1 MiB tiles (36 rows) 8 times, and
// the call took 12.7 -> 9.4 ms on a 2 MiB-L2 Xeon (measured in-process, one thread).
// 256 KiB where the C library cannot tell the L2's size.
constexpr int64_t kFallbackTileBytes = int64_t{1} << 18;
constexpr int64_t kMaxTileRows = 64;

int64_t tile_bytes() {
  static const int64_t bytes = [] {
    const long l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return l2 > 0 ? std::max<int64_t>(kFallbackTileBytes, l2 / 2) : kFallbackTileBytes;
  }();
  return bytes;
}

// A buffer of floats on the 64-byte grid (operator new's aligned form: at::empty's
// tensor cost a 1-token bf16 call about a microsecond more).
struct AlignedDelete {
  void operator()(float* p) const { ::operator delete[](p, std::align_val_t{kAlignment}); }
};
using AlignedFloats = std::unique_ptr<float[], AlignedDelete>;

inline float* aligned_floats(int64_t n) {
  return static_cast<float*>(
      ::operator new[](static_cast<size_t>(n) * sizeof(float), std::align_val_t{kAlignment}));
}

// The n values of a tile of x as fp32 rows for the register blocks: x itself when it is
// fp32 (``copied`` false), else widened exactly into ``buffer``, or copied there when it
// lies off the 64-byte grid and the gate is wide. The blocks load 64 bytes at a time and a
// load across two cache lines costs two, once per pass over the tile (one per kExperts
// experts). Measured on the Xeon (one thread, p50, fp32 rows 4 bytes off the grid, as a
// received message's rows mostly are): DeepSeek-V3 16 tokens 726 -> 658 us (on the grid:
// 559-620), 64 tokens 2.83 -> 2.26 ms; 64 experts of 2048 at 256 tokens 963 -> 870 us;
// 128 of 2880: 2.40 -> 1.96 ms; but Mixtral's 8 experts (two passes) at 256 tokens
// 312 -> 411 us, the copy the dearer: so only past kPassesToCopy passes.
template <typename In>
const float* x_rows(const In* x, int64_t n, bool copied, float* buffer) {
  if constexpr (std::is_same_v<In, float>) {
    if (!copied) return x;
    std::memcpy(buffer, x, static_cast<size_t>(n) * sizeof(float));
  } else {
    for (int64_t i = 0; i < n; ++i) buffer[i] = static_cast<float>(x[i]);
  }
  return buffer;
}

template <typename In>
bool route_rows(const In* x, const float* w, const float* gate_bias, const float* bias,
                const SelectOptions& o, int64_t rows, int64_t d, double bound, float* logits,
                float* scores, int32_t* indices, float* weights) {
  const int64_t e = o.e, k = o.k;
  const int64_t row_bytes = std::max<int64_t>(1, d) * int64_t{sizeof(float)};
  const int64_t tile = std::clamp<int64_t>(tile_bytes() / row_bytes, 1, kMaxTileRows);
  // Rows per task: about 256K multiply-adds (whole tiles), so small calls stay on the
  // calling thread.
  const int64_t grain = std::max<int64_t>(tile, (int64_t{1} << 18) / std::max<int64_t>(1, d * e));
  std::atomic<bool> all_bounded{true};
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    // choice [E], the top-k values [k], and the scores [E] when they are not kept
    std::vector<float> scratch(static_cast<size_t>(e + k + (scores == nullptr ? e : 0)));
    // bf16 / fp16 rows widened to fp32 (exactly) a tile at a time, and fp32 rows off the
    // 64-byte grid copied, into an aligned buffer of this task's rows at most, never
    // zeroed first (a 1-token call of 4096 would otherwise clear 256 KiB)
    const bool copied = !std::is_same_v<In, float> ||
                        (reinterpret_cast<uintptr_t>(x) % kAlignment != 0 &&
                         (e + kExperts - 1) / kExperts > kPassesToCopy);
    const int64_t buffered = copied ? std::min(tile, end - begin) * d : 0;
    const AlignedFloats wide(buffered > 0 ? aligned_floats(buffered) : nullptr);
    bool bounded = true;
    for (int64_t start = begin; start < end; start += tile) {
      const int64_t stop = std::min(end, start + tile);
      const float* rows_x = x_rows(x + start * d, (stop - start) * d, copied,
                                   wide.get());
      tile_logits(rows_x, w, stop - start, d, e, logits + start * e);
      for (int64_t t = start; t < stop; ++t) {
        float* row_logit = logits + t * e;
        if (gate_bias != nullptr) {
          for (int64_t i = 0; i < e; ++i) row_logit[i] += gate_bias[i];
        }
        bounded &= row_bounded(row_logit, e, bound);
        float* row_score = scores == nullptr ? scratch.data() + e + k : scores + t * e;
        select_row(row_logit, bias, o, row_score, scratch.data(), indices + t * k,
                   weights + t * k, scratch.data() + e);
      }
    }
    if (!bounded) all_bounded.store(false, std::memory_order_relaxed);
  });
  return all_bounded.load();
}

std::tuple<std::vector<at::Tensor>, bool> topk_route(
    const at::Tensor& x_in, const at::Tensor& weight_in,
    const c10::optional<at::Tensor>& gate_bias_in, const c10::optional<at::Tensor>& bias,
    int64_t k, bool sigmoid, bool bias_on_logits, int64_t groups, int64_t kept_groups,
    int64_t group_score, bool fill_zero, bool renormalize, double eps, double scale,
    bool want_scores, double bound, const c10::optional<at::Tensor>& load) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.device().is_cpu(), "x: expected a CPU [T, D] tensor");
  TORCH_CHECK(weight_in.dim() == 2 && weight_in.device().is_cpu() &&
                  weight_in.scalar_type() == at::kFloat,
              "weight: expected a CPU float32 [E, D] tensor");
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous();  // no-ops mostly
  TORCH_CHECK(x.size(1) == weight.size(1), "x and weight: hidden sizes differ");
  const int64_t rows = x.size(0), d = x.size(1), e = weight.size(0);
  const SelectOptions o = select_options(e, k, sigmoid, bias_on_logits, groups, kept_groups,
                                         group_score, fill_zero, renormalize, eps, scale);
  const float* b = bias_data(bias, e, "bias");
  const float* gate_bias = bias_data(gate_bias_in, e, "gate_bias");
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor logits = at::empty({rows, e}, f32);
  // The scores are kept only when asked (the aux loss reads them): one allocation less.
  at::Tensor scores = want_scores ? at::empty({rows, e}, f32) : at::Tensor();
  at::Tensor indices = at::empty({rows, k}, f32.dtype(at::kInt));
  at::Tensor weights = at::empty({rows, k}, f32);
  const float* w = weight.const_data_ptr<float>();
  float* l = logits.mutable_data_ptr<float>();
  float* sc = want_scores ? scores.mutable_data_ptr<float>() : nullptr;
  int32_t* ix = indices.mutable_data_ptr<int32_t>();
  float* wt = weights.mutable_data_ptr<float>();
  bool bounded = true;
  switch (x.scalar_type()) {
    case at::kFloat:
      bounded = route_rows(x.const_data_ptr<float>(), w, gate_bias, b, o, rows, d, bound, l,
                           sc, ix, wt);
      break;
    case at::kBFloat16:
      bounded = route_rows(x.const_data_ptr<c10::BFloat16>(), w, gate_bias, b, o, rows, d,
                           bound, l, sc, ix, wt);
      break;
    case at::kHalf:
      bounded = route_rows(x.const_data_ptr<c10::Half>(), w, gate_bias, b, o, rows, d, bound,
                           l, sc, ix, wt);
      break;
    default:
      TORCH_CHECK(false, "x: expected float32, bfloat16 or float16");
  }
  auto [counts, per_token] = tally(ix, rows, k, e, f32);
  if (load.has_value() && load->defined()) {
    TORCH_CHECK(load->dim() == 1 && load->size(0) == e && load->is_contiguous() &&
                    load->device().is_cpu() && load->scalar_type() == at::kLong,
                "load: expected a contiguous int64 CPU [E] tensor");
    // Atomic: passes of one router may run in several threads at once, the GIL released.
    int64_t* total = load->mutable_data_ptr<int64_t>();
    const int64_t* c = counts.const_data_ptr<int64_t>();
    for (int64_t i = 0; i < e; ++i) __atomic_fetch_add(total + i, c[i], __ATOMIC_RELAXED);
  }
  return {{indices, weights, per_token, counts, logits, scores}, bounded};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("topk_route", &topk_route, pybind11::call_guard<pybind11::gil_scoped_release>(),
        "([indices, weights, num_per_token, counts, logits, scores or None], bounded) of "
        "x [T, D] through the gate weight [E, D] and bias [E]; counts added into load "
        "when given");
  m.attr("rows_at_once") = kRows;
  // Whose CPU this is: the library matmul the op competes with (MKL in PyTorch's x86
  // wheels) takes its fastest paths on Intel's, so where the op's own matmul wins
  // depends on it (fused_topk.routes_call).
  __builtin_cpu_init();
  m.attr("cpu_vendor") = __builtin_cpu_is("amd")     ? "amd"
                         : __builtin_cpu_is("intel") ? "intel"
                                                     : "other";
  m.def("topk_select", &topk_select, pybind11::call_guard<pybind11::gil_scoped_release>(),
        "([indices, weights, num_per_token, counts, scores], bounded) from gate logits "
        "[T, E]");
}
