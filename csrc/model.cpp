#include "model.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <stdexcept>

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

namespace alpaca {

Buffer::Buffer(size_t nbytes) : size_(nbytes) {
  const size_t rounded = (nbytes + 63) / 64 * 64;
  void* p = std::aligned_alloc(64, rounded == 0 ? 64 : rounded);
  if (!p) throw std::bad_alloc();
  data_.reset(static_cast<uint8_t*>(p));
}

void Buffer::Free::operator()(uint8_t* p) const { std::free(p); }

// The source is a read-only mapping of the model file: once copied, its pages can leave our
// resident set (the kernel re-reads them from the file if they are ever touched again), so the
// peak RSS of a load stays near one copy of the weights instead of two.
static void release_source_pages(const uint8_t* p, size_t n) {
#if defined(__linux__)
  const uintptr_t page = uintptr_t(sysconf(_SC_PAGESIZE));
  const uintptr_t start = (uintptr_t(p) + page - 1) / page * page;  // whole pages inside only
  const uintptr_t end = (uintptr_t(p) + n) / page * page;
  if (end > start) madvise(reinterpret_cast<void*>(start), end - start, MADV_DONTNEED);
#else
  (void)p;
  (void)n;
#endif
}

static std::vector<float> load_vector(const std::map<std::string, TensorIn>& tensors,
                                      const std::string& name, int64_t n) {
  auto it = tensors.find(name);
  if (it == tensors.end()) throw std::invalid_argument("missing tensor " + name);
  const TensorIn& t = it->second;
  int64_t elems = 0;
  if (t.type != GgmlType::F32 || __builtin_mul_overflow(t.rows, t.cols, &elems) || elems != n ||
      t.nbytes != size_t(n) * 4)
    throw std::invalid_argument("tensor " + name + " must be F32 with " + std::to_string(n) +
                                " elements");
  std::vector<float> v(n);
  std::memcpy(v.data(), t.data, t.nbytes);
  return v;
}

Matrix Model::load_matrix(const std::map<std::string, TensorIn>& tensors,
                          const std::string& name, int64_t rows, int64_t cols) {
  auto it = tensors.find(name);
  if (it == tensors.end()) throw std::invalid_argument("missing tensor " + name);
  const TensorIn& t = it->second;
  if (t.rows != rows || t.cols != cols)  // the Python loader checks this too; a second line
    throw std::invalid_argument("tensor " + name + " has shape (" + std::to_string(t.rows) + ", " +
                                std::to_string(t.cols) + "), expected (" + std::to_string(rows) +
                                ", " + std::to_string(cols) + ")");
  const TypeTraits& tt = type_traits(t.type);
  if (!tt.is_weight)
    throw std::invalid_argument("tensor " + name + ": type " + tt.name + " cannot be a weight");
  if (t.cols % tt.block_size != 0)
    throw std::invalid_argument("tensor " + name + ": row length must be a multiple of " +
                                std::to_string(tt.block_size) + " for " + tt.name);
  Matrix m;
  m.type = t.type;
  m.kernels = &k_->of(t.type, Need::Gemm);
  m.rows = t.rows;
  m.cols = t.cols;
  m.stride = row_bytes(t.type, t.cols);
  size_t total = 0;
  if (t.rows < 0 || __builtin_mul_overflow(m.stride, size_t(t.rows), &total) || total != t.nbytes)
    throw std::invalid_argument("tensor " + name + ": byte size does not match its shape");
  // Repacked into the kernel table's layout (weight_layout.h): same bytes per row.
  m.data = Buffer(k_->packed_bytes(t.type, t.rows, t.cols));
  k_->pack(t.type, t.data, t.rows, t.cols, m.data.data());
  release_source_pages(t.data, t.nbytes);
  weight_bytes_ += t.nbytes;
  return m;
}

// Queries handled together by one attention task: the query heads of one KV head for a few
// consecutive tokens, so each K and V row is converted once for all of them.
static constexpr int64_t kQueriesPerTask = 32;

static int64_t tokens_per_attention_task(int64_t group) {
  return std::max<int64_t>(1, kQueriesPerTask / group);
}

// A query's positions are taken in parts at fixed absolute boundaries [k P, (k + 1) P): a
// softmax per part, the parts folded in order (fold_part). So what a query gets depends on its
// position and the cache alone: not on the tokens sharing its call, on the thread count, or on
// whether it is prefilled or decoded (a prompt found in the cache and recomputed from its last
// token gives the same bits).
static constexpr int64_t kPartPositions = 256;

static int64_t parts_for(int64_t n_pos) { return (n_pos + kPartPositions - 1) / kPartPositions; }

// Decoding over a long context: one task per KV head would keep only n_kv_heads threads busy
// (3 for SmolLM2), so when a batch has fewer than kMinTasksPerThread tasks (block, kv head)
// per thread, its decode steps' parts are spread over about kAttentionTasksPerThread tasks per
// thread, each storing its parts' outputs for merge_parts.
static constexpr int64_t kMinTasksPerThread = 2;
static constexpr int64_t kAttentionTasksPerThread = 8;

static int64_t max_part_groups(int n_threads, int64_t n_kv_heads) {
  return std::max<int64_t>(1, (kAttentionTasksPerThread * n_threads + n_kv_heads - 1) / n_kv_heads);
}

// Folds one part's output o (its softmax normalizer log_sum) into a query's running result:
// acc = sum_j e^(log_sum_j - top) o_j and total = sum_j e^(log_sum_j - top) over the parts so
// far. One copy of the code (noinline) for every caller, so one order of float operations.
[[gnu::noinline]] static void fold_part(int64_t hd, const float* o, float log_sum, bool first,
                                        float* acc, float& top, float& total) {
  if (first) {
    std::copy(o, o + hd, acc);
    top = log_sum;
    total = 1.0f;
  } else if (log_sum > top) {
    const float c = std::exp(top - log_sum);
    for (int64_t d = 0; d < hd; d++) acc[d] = acc[d] * c + o[d];
    total = total * c + 1.0f;
    top = log_sum;
  } else {
    const float w = std::exp(log_sum - top);
    for (int64_t d = 0; d < hd; d++) acc[d] += w * o[d];
    total += w;
  }
}

[[gnu::noinline]] static void finish_folds(int64_t hd, const float* acc, float total, float* out) {
  for (int64_t d = 0; d < hd; d++) out[d] = acc[d] / total;
}

KvCache::KvCache(int64_t n_slots, int64_t n_layers, int64_t n_kv_heads, int64_t n_ctx,
                 int64_t head_dim, GgmlType type)
    : n_slots_(n_slots), n_layers_(n_layers), n_kv_heads_(n_kv_heads), n_ctx_(n_ctx), type_(type),
      row_bytes_(alpaca::row_bytes(type, head_dim)) {
  size_t rows = 0, bytes = 0;
  if (__builtin_mul_overflow(size_t(n_slots), size_t(n_layers), &rows) ||
      __builtin_mul_overflow(rows, size_t(n_kv_heads), &rows) ||
      __builtin_mul_overflow(rows, size_t(n_ctx), &rows) ||
      __builtin_mul_overflow(rows, row_bytes_, &bytes))
    throw std::invalid_argument("n_ctx: KV cache size overflows");
  k_ = Buffer(bytes);
  v_ = Buffer(bytes);
  std::memset(k_.data(), 0, k_.size());
  std::memset(v_.data(), 0, v_.size());
}

// Each (layer, head) holds its positions in one run: [0, n_pos) of it is one copy.
std::vector<uint8_t> KvCache::save(int64_t n_pos) {
  const size_t run = size_t(n_pos) * row_bytes_, n_runs = size_t(n_layers_ * n_kv_heads_);
  std::vector<uint8_t> out(2 * n_runs * run);
  for (int64_t l = 0, i = 0; l < n_layers_; l++) {
    for (int64_t h = 0; h < n_kv_heads_; h++, i++) {
      std::memcpy(out.data() + size_t(i) * run, k(0, l, h, 0), run);
      std::memcpy(out.data() + (n_runs + size_t(i)) * run, v(0, l, h, 0), run);
    }
  }
  return out;
}

void KvCache::load(const uint8_t* data, size_t nbytes, int64_t n_pos) {
  const size_t run = size_t(n_pos) * row_bytes_, n_runs = size_t(n_layers_ * n_kv_heads_);
  if (nbytes != 2 * n_runs * run)
    throw std::invalid_argument("load_kv: state of " + std::to_string(nbytes) + " bytes, expected " +
                                std::to_string(2 * n_runs * run) + " for " + std::to_string(n_pos) +
                                " positions of this model and cache type");
  for (int64_t l = 0, i = 0; l < n_layers_; l++) {
    for (int64_t h = 0; h < n_kv_heads_; h++, i++) {
      std::memcpy(k(0, l, h, 0), data + size_t(i) * run, run);
      std::memcpy(v(0, l, h, 0), data + (n_runs + size_t(i)) * run, run);
    }
  }
}

Model::Model(const HParams& hp, const std::map<std::string, TensorIn>& tensors, int64_t n_ctx,
             int n_threads, bool kv_f16, const KernelTable* kernels, int64_t n_slots)
    : hp_(hp),
      n_ctx_(n_ctx),
      n_slots_(n_slots),
      k_(kernels),
      f16_(kernels->of(GgmlType::F16, Need::FromFloat)),
      pool_(n_threads),
      kv_kernels_(kernels->of(kv_f16 ? GgmlType::F16 : GgmlType::F32, Need::Gemm)) {
  if (n_ctx < 1) throw std::invalid_argument("n_ctx must be >= 1");
  if (n_slots < 1 || n_slots > kMaxBatch)
    throw std::invalid_argument("n_slots = " + std::to_string(n_slots) + ", expected 1.." +
                                std::to_string(kMaxBatch));
  token_embd = load_matrix(tensors, "token_embd.weight", hp.n_vocab, hp.dim);
  k_->of(token_embd.type, Need::ToFloat);  // embed() dequantizes its rows: refuse here if it cannot
  embd_row_.resize(token_embd.stride);
  output_norm = load_vector(tensors, "output_norm.weight", hp.dim);
  if (tensors.count("output.weight")) output = load_matrix(tensors, "output.weight", hp.n_vocab, hp.dim);
  for (int64_t l = 0; l < hp.n_layers; l++) {
    const std::string p = "blk." + std::to_string(l) + ".";
    Layer L;
    L.attn_norm = load_vector(tensors, p + "attn_norm.weight", hp.dim);
    L.attn_q = load_matrix(tensors, p + "attn_q.weight", hp.n_heads * hp.head_dim, hp.dim);
    L.attn_k = load_matrix(tensors, p + "attn_k.weight", hp.n_kv_heads * hp.head_dim, hp.dim);
    L.attn_v = load_matrix(tensors, p + "attn_v.weight", hp.n_kv_heads * hp.head_dim, hp.dim);
    L.attn_output = load_matrix(tensors, p + "attn_output.weight", hp.dim, hp.n_heads * hp.head_dim);
    L.ffn_norm = load_vector(tensors, p + "ffn_norm.weight", hp.dim);
    L.ffn_gate = load_matrix(tensors, p + "ffn_gate.weight", hp.ffn_dim, hp.dim);
    L.ffn_up = load_matrix(tensors, p + "ffn_up.weight", hp.ffn_dim, hp.dim);
    L.ffn_down = load_matrix(tensors, p + "ffn_down.weight", hp.dim, hp.ffn_dim);
    layers.push_back(std::move(L));
  }
  // RoPE frequencies base^(-2i/n_rot), each divided by rope_freqs.weight[i] when present (RoPE
  // scaling: Llama 3's per-frequency factors, llama.cpp's linear factor folded in by Python).
  std::vector<float> rope_div(size_t(hp.n_rot / 2), 1.0f);  // (n_rot / 2)
  if (tensors.count("rope_freqs.weight")) rope_div = load_vector(tensors, "rope_freqs.weight", hp.n_rot / 2);
  for (int64_t i = 0; i < hp.n_rot / 2; i++) {
    if (!(rope_div[i] > 0.0f) || !std::isfinite(rope_div[i]))
      throw std::invalid_argument("tensor rope_freqs.weight: divisors must be finite and positive");
    inv_freq_.push_back(std::pow(double(hp.rope_base), -2.0 * double(i) / double(hp.n_rot)) / rope_div[i]);
  }

  kv_ = KvCache(n_slots, hp.n_layers, hp.n_kv_heads, n_ctx, hp.head_dim,
                kv_f16 ? GgmlType::F16 : GgmlType::F32);
  k_->of(kv_.type(), Need::FromFloat);  // kv_kernels_ (its gemm checked above) appends rows too

  const int64_t B = kMaxBatch;
  const int64_t q_dim = hp.n_heads * hp.head_dim, kv_dim = hp.n_kv_heads * hp.head_dim;
  x_.resize(B * hp.dim);
  xb_.resize(B * std::max(hp.dim, q_dim));
  q_.resize(B * q_dim);
  k_cur_.resize(B * kv_dim);
  v_cur_.resize(B * kv_dim);
  att_.resize(B * q_dim);
  proj_.resize(B * hp.dim);
  gate_.resize(B * hp.ffn_dim);
  up_.resize(B * hp.ffn_dim);
  const int64_t widest = std::max({hp.dim, hp.ffn_dim, q_dim});
  act_.resize(kGgmlTypeSlots);
  auto need_act = [&](const Matrix& m) {
    const GgmlType at = type_traits(m.type).vec_dot_type;
    if (at != GgmlType::F32 && act_[int(at)].size() == 0) {
      k_->of(at, Need::FromFloat);  // refuse at load a format this table cannot make
      act_[int(at)] = Buffer(B * row_bytes(at, widest));
    }
  };
  need_act(token_embd);
  if (output.rows) need_act(output);
  for (const Layer& L : layers)
    for (const Matrix* m : {&L.attn_q, &L.attn_k, &L.attn_v, &L.attn_output, &L.ffn_gate,
                            &L.ffn_up, &L.ffn_down})
      need_act(*m);
  act_info_.resize(kGgmlTypeSlots);
  for (GgmlType at : {GgmlType::Q8_0, GgmlType::Q8_1})
    if (act_[int(at)].size() > 0) act_info_[int(at)].resize(size_t(B * (widest / QK)));
  const int64_t max_q = tokens_per_attention_task(hp.n_heads / hp.n_kv_heads) * (hp.n_heads / hp.n_kv_heads);
  const size_t threads = size_t(pool_.size());
  scores_.resize(threads * max_q * kPartPositions);
  attn_q_.resize(threads * max_q * hp.head_dim);
  attn_o_.resize(threads * max_q * hp.head_dim);
  attn_acc_.resize(threads * max_q * hp.head_dim);
  attn_norm_.resize(threads * 3 * max_q);
  // A decode step's parts (one query per head): every run of a batch (at most one per slot)
  // may be one, a region each.
  part_rows_per_run_ = size_t(hp.n_heads * parts_for(n_ctx));
  part_o_.resize(size_t(n_slots) * part_rows_per_run_ * hp.head_dim);
  part_log_sum_.resize(size_t(n_slots) * part_rows_per_run_);
  slot_len_.assign(size_t(n_slots), 0);
  tok_pos_.resize(B);
  tok_slot_.resize(B);
  out_rows_.reserve(B);
  runs_.reserve(B);
  plans_.reserve(B);
  tasks_.reserve(size_t(B) + size_t(n_slots) * max_part_groups(pool_.size(), hp.n_kv_heads));
}

void Model::embed(int32_t token, float* out) {
  uint8_t* row = embd_row_.data();
  k_->unpack_row(token_embd.type, token_embd.data.data(), hp_.dim, token, row);
  token_embd.kernels->to_float(row, out, hp_.dim);  // present: checked at load
}

void Model::matmuls(const float* x, int64_t n_tok, int64_t x_stride,
                    std::initializer_list<MatmulJob> jobs) {
  const int64_t cols = jobs.begin()->w->cols;
  // The activation formats the jobs' weight types multiply with (TypeTraits::vec_dot_type),
  // each made once for all jobs; F32 is x itself.
  GgmlType formats[kGgmlTypeSlots];  // distinct type ids
  int n_formats = 0;
  bool need_info[kGgmlTypeSlots] = {};
  for (const auto& j : jobs) {
    const GgmlType at = type_traits(j.w->type).vec_dot_type;
    need_info[int(at)] |= j.w->kernels->uses_act_info;
    if (at != GgmlType::F32 && std::find(formats, formats + n_formats, at) == formats + n_formats)
      formats[n_formats++] = at;
  }
  const int64_t nb = cols / QK;
  // Quantize the activations once per format, one token per task (with the block info the
  // kernels that use it read).
  auto quantize = [&](int64_t t, int) {
    for (int f = 0; f < n_formats; f++) {
      uint8_t* dst = act_[int(formats[f])].data() + size_t(t) * row_bytes(formats[f], cols);
      k_->types[int(formats[f])].from_float(x + t * x_stride, dst, cols);  // checked at load
      if (need_info[int(formats[f])])
        act_block_info(formats[f], dst, nb, act_info_[int(formats[f])].data() + t * nb);
    }
  };
  // A few tokens (decode steps of a few sequences) take well under a microsecond each:
  // quantized here rather than behind one more barrier of the pool.
  constexpr int64_t kInlineQuantizeValues = 1 << 14;
  if (n_formats > 0 && n_tok * cols <= kInlineQuantizeValues) {
    for (int64_t t = 0; t < n_tok; t++) quantize(t, 0);
  } else if (n_formats > 0) {
    pool_.parallel_for(n_tok, quantize);
  }
  // Split every job's rows into chunks of decreasing size ("guided" scheduling): each chunk
  // takes 1 / (2 * threads) of the rows still left, in whole multiples of 16 rows (a 64-byte
  // line of float outputs, whole weight panels). The first, large chunks keep each thread's
  // weight reads long sequential streams; the small last ones even out the finish.
  constexpr int64_t kRowAlign = 16;
  std::vector<Chunk>& chunks = chunks_;  // reused: no allocation per call once grown
  chunks.clear();
  for (const auto& j : jobs) {
    for (int64_t r = 0; r < j.w->rows;) {
      const int64_t share = (j.w->rows - r) / (2 * pool_.size());
      const int64_t rows = std::min(j.w->rows - r, std::max(kRowAlign, share / kRowAlign * kRowAlign));
      chunks.push_back({&j, r, rows});
      r += rows;
    }
  }
  pool_.parallel_for(int64_t(chunks.size()), [&](int64_t c, int) {
    const MatmulJob& j = *chunks[c].job;
    const Matrix& w = *j.w;
    const int64_t r0 = chunks[c].r0, nr = chunks[c].n_rows;
    const GgmlType at = type_traits(w.type).vec_dot_type;
    const void* act = at == GgmlType::F32 ? static_cast<const void*>(x) : act_[int(at)].data();
    const size_t act_stride = at == GgmlType::F32 ? size_t(x_stride) * 4 : row_bytes(at, cols);
    w.kernels->gemm(w.cols, w.data.data() + size_t(r0) * w.stride, w.stride, nr, act, act_stride,
                    w.kernels->uses_act_info ? act_info_[int(at)].data() : nullptr, n_tok,
                    j.out + r0, j.out_stride);
  });
}

void Model::rope(float* v, int64_t n_heads_here, int64_t pos) const {
  // Meta's interleaved pairs: (v[2i], v[2i+1]) rotated by pos * inv_freq_[i].
  float cs[512], sn[512];  // n_rot / 2 <= 512, checked by the loader (head_dim <= 1024)
  for (int64_t i = 0; i < hp_.n_rot / 2; i++) {
    const double a = double(pos) * inv_freq_[i];
    cs[i] = float(std::cos(a));
    sn[i] = float(std::sin(a));
  }
  for (int64_t h = 0; h < n_heads_here; h++) {
    float* hv = v + h * hp_.head_dim;
    for (int64_t i = 0; i < hp_.n_rot / 2; i++) {
      const float x0 = hv[2 * i], x1 = hv[2 * i + 1];
      hv[2 * i] = x0 * cs[i] - x1 * sn[i];
      hv[2 * i + 1] = x0 * sn[i] + x1 * cs[i];
    }
  }
}

void Model::round_to_f16(float* x, int64_t n) const {
  fp16_t tmp[256];
  for (int64_t i = 0; i < n; i += 256) {
    const int64_t m = std::min<int64_t>(256, n - i);
    f16_.from_float(x + i, tmp, m);
    f16_.to_float(tmp, x + i, m);
  }
}

void Model::attention(int64_t layer, const SeqRun* runs, int64_t n_runs) {
  const int64_t n_kv = hp_.n_kv_heads, group = hp_.n_heads / hp_.n_kv_heads;
  const int64_t tpt = tokens_per_attention_task(group);
  // One plan per run. A decode step over several parts: a task per (group of its parts, kv
  // head), merged afterwards; any other run: a task per (block of tpt tokens, kv head) that
  // folds its parts itself. Same parts, same folds in the same order either way: this choice
  // is scheduling only.
  plans_.clear();
  tasks_.clear();
  int64_t macs = 0, blocks = 0;
  for (int64_t r = 0; r < n_runs; r++) blocks += (runs[r].n + tpt - 1) / tpt;
  // Spreading a decode step's parts pays only when the blocks alone leave threads idle.
  const bool spread = blocks * n_kv < kMinTasksPerThread * pool_.size();
  for (int64_t r = 0; r < n_runs; r++) {
    const SeqRun& run = runs[r];
    AttentionPlan p;
    p.layer = layer;
    p.slot = run.slot;
    p.base = run.base;
    p.n = run.n;
    p.start_pos = run.start_pos;
    p.group = group;
    p.tpt = tpt;
    p.n_parts = parts_for(run.start_pos + run.n);
    p.n_part_groups = spread && run.n == 1 ? std::min(p.n_parts, max_part_groups(pool_.size(), n_kv)) : 1;
    p.part_row0 = size_t(r) * part_rows_per_run_;
    plans_.push_back(p);
    macs += run.n * (run.start_pos + run.n) * hp_.n_heads * hp_.head_dim;
  }
  for (const AttentionPlan& p : plans_) {
    if (p.n_part_groups > 1) {
      for (int64_t pg = 0; pg < p.n_part_groups; pg++) tasks_.push_back({&p, 0, pg});
    } else {
      for (int64_t t0 = 0; t0 < p.n; t0 += p.tpt) tasks_.push_back({&p, t0, -1});
    }
  }
  auto task = [&](int64_t i, int thread) {
    const AttentionTask& t = tasks_[i / n_kv];
    if (t.part_group >= 0) {
      attend_part_group(*t.plan, i % n_kv, t.part_group, thread);
    } else {
      attend_block(*t.plan, t.t0, i % n_kv, thread);
    }
  };
  const int64_t n_tasks = int64_t(tasks_.size()) * n_kv;
  // Decoding over a short context is a few microseconds of work: waking the pool for it
  // costs more than it saves (one barrier less per layer and token).
  constexpr int64_t kInlineAttentionMacs = 1 << 16;
  if (macs < kInlineAttentionMacs) {
    for (int64_t i = 0; i < n_tasks; i++) task(i, 0);
  } else {
    pool_.parallel_for(n_tasks, task);
  }
  for (const AttentionPlan& p : plans_)
    if (p.n_part_groups > 1) merge_parts(p);
}

void Model::load_queries(const AttentionPlan& p, int64_t t0, int64_t nt, int64_t g, float* qbuf) const {
  const int64_t hd = hp_.head_dim, group = p.group, q_dim = hp_.n_heads * hd;
  for (int64_t t = 0; t < nt; t++)
    std::memcpy(qbuf + t * group * hd, q_.data() + (p.base + t0 + t) * q_dim + g * group * hd,
                size_t(group * hd) * sizeof(float));
  if (kv_.type() == GgmlType::F16) round_to_f16(qbuf, nt * group * hd);
}

// scores = K q for the queries of tokens [t0, t0 + nt) against the part's positions (one
// gemm), a causal softmax per query, then out = sum_p score_p V_p (one mix_rows). A query that
// sees none of the part gets log_sum -inf and a zero output.
void Model::attend_one_part(const AttentionPlan& p, int64_t t0, int64_t nt, int64_t g, int64_t part,
                            const float* qbuf, int thread, float* out, float* log_sum) {
  const int64_t hd = hp_.head_dim, group = p.group, n_q = nt * group;
  const bool f16 = kv_.type() == GgmlType::F16;
  const size_t kv_stride = kv_.row_bytes();
  const int64_t p0 = part * kPartPositions;
  const int64_t len = std::min(p.start_pos + t0 + nt - p0, kPartPositions);  // > 0: callers
  float* scores = scores_.data() + size_t(thread) * p.tpt * group * kPartPositions;  // (n_q, P)
  kv_kernels_.gemm(hd, kv_.k(p.slot, p.layer, g, p0), kv_stride, len, qbuf, hd * sizeof(float),
                   nullptr, n_q, scores, kPartPositions);
  const float scale = 1.0f / std::sqrt(float(hd));
  for (int64_t i = 0; i < n_q; i++) {
    float* sc = scores + i * kPartPositions;
    // causal: query i sees positions 0..its own, of which `seen` fall in this part
    const int64_t seen = std::clamp<int64_t>(p.start_pos + t0 + i / group + 1 - p0, 0, len);
    log_sum[i] = -INFINITY;
    if (seen > 0) {
      log_sum[i] = k_->softmax(sc, seen, scale);
      if (f16) round_to_f16(sc, seen);
    }
    std::fill(sc + seen, sc + len, 0.0f);
  }
  k_->mix_rows(kv_.type(), hd, kv_.v(p.slot, p.layer, g, p0), kv_stride, len, scores,
               kPartPositions, n_q, out, hd);
}

void Model::attend_block(const AttentionPlan& p, int64_t t0, int64_t g, int thread) {
  const int64_t hd = hp_.head_dim, group = p.group, q_dim = hp_.n_heads * hd;
  const int64_t max_q = p.tpt * group, nt = std::min(p.tpt, p.n - t0), n_q = nt * group;
  float* qbuf = attn_q_.data() + size_t(thread) * max_q * hd;    // (n_q, hd), query (t, h)
  float* part_out = attn_o_.data() + size_t(thread) * max_q * hd;
  float* acc = attn_acc_.data() + size_t(thread) * max_q * hd;
  float* log_sum = attn_norm_.data() + size_t(thread) * 3 * max_q;
  float* top = log_sum + max_q;
  float* total = top + max_q;
  load_queries(p, t0, nt, g, qbuf);
  const int64_t n_parts = parts_for(p.start_pos + t0 + nt);
  if (n_parts == 1) {  // folding one part is a copy and a division by 1: the same bits
    attend_one_part(p, t0, nt, g, 0, qbuf, thread, part_out, log_sum);
    for (int64_t t = 0; t < nt; t++)
      std::memcpy(att_.data() + (p.base + t0 + t) * q_dim + g * group * hd, part_out + t * group * hd,
                  size_t(group * hd) * sizeof(float));
    return;
  }
  for (int64_t part = 0; part < n_parts; part++) {
    attend_one_part(p, t0, nt, g, part, qbuf, thread, part_out, log_sum);
    for (int64_t i = 0; i < n_q; i++)  // every query sees part 0; later ones only if it reaches them
      if (p.start_pos + t0 + i / group >= part * kPartPositions)
        fold_part(hd, part_out + i * hd, log_sum[i], part == 0, acc + i * hd, top[i], total[i]);
  }
  for (int64_t i = 0; i < n_q; i++)
    finish_folds(hd, acc + i * hd, total[i],
                 att_.data() + (p.base + t0 + i / group) * q_dim + (g * group + i % group) * hd);
}

// Part group pg of a one-token run's parts: each part's outputs (group, hd) and normalizers
// into its rows of part_o_ / part_log_sum_ (rows (g n_parts + part) group.. of the run's region).
void Model::attend_part_group(const AttentionPlan& p, int64_t g, int64_t pg, int thread) {
  const int64_t hd = hp_.head_dim, group = p.group;
  float* qbuf = attn_q_.data() + size_t(thread) * p.tpt * group * hd;
  load_queries(p, 0, 1, g, qbuf);
  const int64_t first = pg * p.n_parts / p.n_part_groups, last = (pg + 1) * p.n_parts / p.n_part_groups;
  for (int64_t part = first; part < last; part++) {
    const size_t row = p.part_row0 + size_t((g * p.n_parts + part) * group);
    attend_one_part(p, 0, 1, g, part, qbuf, thread, part_o_.data() + row * hd,
                    part_log_sum_.data() + row);
  }
}

// att_ of a one-token run from its parts, folded in part order exactly as attend_block folds.
void Model::merge_parts(const AttentionPlan& p) {
  const int64_t hd = hp_.head_dim, group = p.group, q_dim = hp_.n_heads * hd;
  float* acc = attn_acc_.data();  // the pool is idle: thread 0's scratch
  for (int64_t g = 0; g < hp_.n_kv_heads; g++) {
    for (int64_t i = 0; i < group; i++) {
      float top = 0.0f, total = 0.0f;
      for (int64_t part = 0; part < p.n_parts; part++) {
        const size_t row = p.part_row0 + size_t((g * p.n_parts + part) * group + i);
        fold_part(hd, part_o_.data() + row * hd, part_log_sum_[row], part == 0, acc, top, total);
      }
      finish_folds(hd, acc, total, att_.data() + p.base * q_dim + (g * group + i) * hd);
    }
  }
}

std::vector<uint8_t> Model::save_kv(int64_t n_pos) {
  if (n_pos < 0 || n_pos > n_ctx_) throw std::invalid_argument("save_kv: n_pos outside the context");
  std::lock_guard<std::mutex> lock(forward_mutex_);
  return kv_.save(n_pos);
}

void Model::load_kv(const uint8_t* data, size_t nbytes, int64_t n_pos) {
  if (n_pos < 0 || n_pos > n_ctx_) throw std::invalid_argument("load_kv: n_pos outside the context");
  std::lock_guard<std::mutex> lock(forward_mutex_);
  kv_.load(data, nbytes, n_pos);
}

void Model::forward(const int32_t* tokens, int64_t n, int64_t start_pos, bool all_logits,
                    float* logits) {
  if (n < 1) throw std::invalid_argument("forward: empty batch of tokens");
  if (start_pos < 0 || start_pos + n > n_ctx_)
    throw std::invalid_argument("forward: positions " + std::to_string(start_pos) + ".." +
                                std::to_string(start_pos + n - 1) + " outside the context of " +
                                std::to_string(n_ctx_));
  for (int64_t i = 0; i < n; i++)
    if (tokens[i] < 0 || tokens[i] >= hp_.n_vocab)
      throw std::invalid_argument("forward: token id " + std::to_string(tokens[i]) +
                                  " at index " + std::to_string(i) + " outside [0, " +
                                  std::to_string(hp_.n_vocab) + ")");
  std::lock_guard<std::mutex> lock(forward_mutex_);
  slot_len_[0] = start_pos + n;
  for (int64_t b = 0; b < n; b += kMaxBatch) {
    const int64_t nb = std::min(kMaxBatch, n - b);
    const bool last = b + nb == n;
    const SeqRun run{0, start_pos + b, 0, nb};
    out_rows_.clear();
    for (int64_t t = all_logits ? 0 : (last ? nb - 1 : nb); t < nb; t++) out_rows_.push_back(t);
    float* out = all_logits ? logits + size_t(b) * hp_.n_vocab : logits;
    forward_batch(tokens + b, nb, &run, 1, out_rows_.data(), int64_t(out_rows_.size()),
                  false, out);
  }
}

void Model::check_slot(int64_t slot, const char* what) const {
  if (slot < 0 || slot >= n_slots_)
    throw std::invalid_argument(std::string(what) + ": slot " + std::to_string(slot) +
                                " outside [0, " + std::to_string(n_slots_) + ")");
}

int64_t Model::slot_length(int64_t slot) const {
  check_slot(slot, "slot_length");
  return slot_len_[size_t(slot)];
}

void Model::rewind_slot(int64_t slot, int64_t n_pos) {
  check_slot(slot, "rewind_slot");
  std::lock_guard<std::mutex> lock(forward_mutex_);
  if (n_pos < 0 || n_pos > slot_len_[size_t(slot)])
    throw std::invalid_argument("rewind_slot: n_pos " + std::to_string(n_pos) + " outside [0, " +
                                std::to_string(slot_len_[size_t(slot)]) + "] (slot " +
                                std::to_string(slot) + "'s length)");
  slot_len_[size_t(slot)] = n_pos;
}

void Model::forward_seqs(const int32_t* tokens, const int32_t* seq, const int64_t* pos, int64_t n,
                         const uint8_t* want, bool hidden, float* out) {
  if (n < 1) throw std::invalid_argument("forward_seqs: empty batch of tokens");
  std::lock_guard<std::mutex> lock(forward_mutex_);
  // The runs of the whole input, checked before anything is computed.
  std::vector<SeqRun> runs;
  std::vector<uint8_t> seen(size_t(n_slots_), 0);
  for (int64_t i = 0; i < n; i++) {
    const std::string at = "forward_seqs: token " + std::to_string(i) + ": ";
    if (tokens[i] < 0 || tokens[i] >= hp_.n_vocab)
      throw std::invalid_argument(at + "id " + std::to_string(tokens[i]) + " outside [0, " +
                                  std::to_string(hp_.n_vocab) + ")");
    if (seq[i] < 0 || seq[i] >= n_slots_)
      throw std::invalid_argument(at + "sequence " + std::to_string(seq[i]) + " outside [0, " +
                                  std::to_string(n_slots_) + ")");
    if (pos[i] < 0 || pos[i] >= n_ctx_)
      throw std::invalid_argument(at + "position " + std::to_string(pos[i]) +
                                  " outside the context of " + std::to_string(n_ctx_));
    if (i > 0 && seq[i] == seq[i - 1]) {
      if (pos[i] != pos[i - 1] + 1)
        throw std::invalid_argument(at + "position " + std::to_string(pos[i]) + " does not follow " +
                                    std::to_string(pos[i - 1]) + " of the same sequence");
      runs.back().n++;
      continue;
    }
    if (seen[size_t(seq[i])])
      throw std::invalid_argument(at + "sequence " + std::to_string(seq[i]) +
                                  " appears in two runs (a sequence's tokens must be adjacent)");
    seen[size_t(seq[i])] = 1;
    if (pos[i] > slot_len_[size_t(seq[i])])
      throw std::invalid_argument(at + "position " + std::to_string(pos[i]) +
                                  " leaves a gap after the " +
                                  std::to_string(slot_len_[size_t(seq[i])]) + " positions slot " +
                                  std::to_string(seq[i]) + " holds");
    runs.push_back({seq[i], pos[i], i, 1});
  }
  for (const SeqRun& r : runs) slot_len_[size_t(r.slot)] = r.start_pos + r.n;
  // Batches of up to kMaxBatch tokens; a run that crosses a batch boundary goes on in the next.
  const int64_t width = hidden ? hp_.dim : hp_.n_vocab;
  size_t r = 0;
  for (int64_t b = 0; b < n; b += kMaxBatch) {
    const int64_t nb = std::min(kMaxBatch, n - b);
    runs_.clear();
    for (; r < runs.size() && runs[r].base < b + nb; r++) {
      SeqRun part = runs[r];
      const int64_t skip = std::max<int64_t>(0, b - part.base);
      part.start_pos += skip;
      part.base = part.base + skip - b;
      part.n = std::min(part.n - skip, nb - part.base);
      runs_.push_back(part);
      if (runs[r].base + runs[r].n > b + nb) break;  // goes on in the next batch
    }
    out_rows_.clear();
    for (int64_t t = 0; t < nb; t++)
      if (want[b + t]) out_rows_.push_back(t);
    forward_batch(tokens + b, nb, runs_.data(), int64_t(runs_.size()), out_rows_.data(),
                  int64_t(out_rows_.size()), hidden, out);
    out += out_rows_.size() * size_t(width);
  }
}

void Model::forward_batch(const int32_t* tokens, int64_t n, const SeqRun* runs, int64_t n_runs,
                          const int64_t* out_rows, int64_t n_out, bool hidden,
                          float* out) {
  const int64_t dim = hp_.dim, hd = hp_.head_dim;
  const int64_t q_dim = hp_.n_heads * hd, kv_dim = hp_.n_kv_heads * hd, ffn = hp_.ffn_dim;
  for (int64_t r = 0; r < n_runs; r++)
    for (int64_t t = 0; t < runs[r].n; t++) {
      tok_pos_[runs[r].base + t] = runs[r].start_pos + t;
      tok_slot_[runs[r].base + t] = runs[r].slot;
    }

  // x = token_embd[tokens]
  for (int64_t t = 0; t < n; t++) embed(tokens[t], x_.data() + t * dim);

  for (int64_t l = 0; l < hp_.n_layers; l++) {
    const Layer& L = layers[l];
    // xb = rmsnorm(x) * attn_norm
    for (int64_t t = 0; t < n; t++)
      k_->rmsnorm(x_.data() + t * dim, L.attn_norm.data(), xb_.data() + t * dim, dim, hp_.rms_eps);
    // q, k, v = xb @ Wq.T, xb @ Wk.T, xb @ Wv.T
    matmuls(xb_.data(), n, dim, {{&L.attn_q, q_.data(), q_dim},
                                  {&L.attn_k, k_cur_.data(), kv_dim},
                                  {&L.attn_v, v_cur_.data(), kv_dim}});
    // RoPE on q and k; append k, v to their slot's cache at their positions
    for (int64_t t = 0; t < n; t++) {
      const int64_t pos = tok_pos_[t], slot = tok_slot_[t];
      rope(q_.data() + t * q_dim, hp_.n_heads, pos);
      rope(k_cur_.data() + t * kv_dim, hp_.n_kv_heads, pos);
      for (int64_t g = 0; g < hp_.n_kv_heads; g++) {
        kv_kernels_.from_float(k_cur_.data() + t * kv_dim + g * hd, kv_.k(slot, l, g, pos), hd);
        kv_kernels_.from_float(v_cur_.data() + t * kv_dim + g * hd, kv_.v(slot, l, g, pos), hd);
      }
    }
    // att = softmax(q k^T / sqrt(hd)) v, causal within each sequence, per head
    attention(l, runs, n_runs);
    // x += att @ Wo.T
    matmuls(att_.data(), n, q_dim, {{&L.attn_output, proj_.data(), dim}});
    for (int64_t i = 0; i < n * dim; i++) x_[i] += proj_[i];
    // xb = rmsnorm(x) * ffn_norm
    for (int64_t t = 0; t < n; t++)
      k_->rmsnorm(x_.data() + t * dim, L.ffn_norm.data(), xb_.data() + t * dim, dim, hp_.rms_eps);
    // gate, up = xb @ Wg.T, xb @ Wu.T; h = silu(gate) * up
    matmuls(xb_.data(), n, dim, {{&L.ffn_gate, gate_.data(), ffn}, {&L.ffn_up, up_.data(), ffn}});
    for (int64_t t = 0; t < n; t++)
      k_->swiglu(gate_.data() + t * ffn, up_.data() + t * ffn, gate_.data() + t * ffn, ffn);
    // x += h @ Wd.T
    matmuls(gate_.data(), n, ffn, {{&L.ffn_down, proj_.data(), dim}});
    for (int64_t i = 0; i < n * dim; i++) x_[i] += proj_[i];
  }
  if (n_out == 0) return;
  // h = rmsnorm(x) * output_norm for the wanted rows (the output itself when hidden)
  float* h = hidden ? out : xb_.data();
  for (int64_t i = 0; i < n_out; i++)
    k_->rmsnorm(x_.data() + out_rows[i] * dim, output_norm.data(), h + i * dim, dim, hp_.rms_eps);
  if (hidden) return;
  // logits = h @ output.T (token_embd when tied)
  const Matrix& out_w = output.rows ? output : token_embd;
  matmuls(xb_.data(), n_out, dim, {{&out_w, out, hp_.n_vocab}});
}

}  // namespace alpaca
