// The LLaMA forward pass: all layers for a batch of tokens in one call (docs/design.md,
// decision 5).
#pragma once
#include <cstdint>
#include <initializer_list>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "kernels.h"
#include "thread_pool.h"

namespace alpaca {

// Hyper-parameters, already validated by the Python loader (alpaca_cpu/gguf_file.py).
struct HParams {
  int64_t n_vocab, dim, n_layers, n_heads, n_kv_heads, head_dim, ffn_dim, n_rot;
  float rope_base, rms_eps;
};

// A tensor handed over from Python: GGML type, (rows, cols) with cols contiguous.
struct TensorIn {
  GgmlType type;
  int64_t rows, cols;
  const uint8_t* data;
  size_t nbytes;
};

// 64-byte aligned owned bytes.
class Buffer {
 public:
  Buffer() = default;
  explicit Buffer(size_t nbytes);
  uint8_t* data() { return data_.get(); }
  const uint8_t* data() const { return data_.get(); }
  size_t size() const { return size_; }

 private:
  struct Free { void operator()(uint8_t* p) const; };
  std::unique_ptr<uint8_t, Free> data_;
  size_t size_ = 0;
};

// Float scratch for activations: allocated but not zeroed, so its pages become resident only
// when a batch that large runs (a decode step touches a few KiB; a 512-token prefill all of it).
class Scratch {
 public:
  void resize(size_t n) {
    buf_ = Buffer(n * sizeof(float));
    n_ = n;
  }
  float* data() { return reinterpret_cast<float*>(buf_.data()); }
  const float* data() const { return reinterpret_cast<const float*>(buf_.data()); }
  float& operator[](size_t i) { return data()[i]; }
  size_t size() const { return n_; }

 private:
  Buffer buf_;
  size_t n_ = 0;
};

// A weight matrix (rows, cols) in one GGML type, packed for the model's kernel table
// (weight_layout.h); `stride` is the bytes of one GGML row.
struct Matrix {
  GgmlType type = GgmlType::F32;
  const TypeKernels* kernels = nullptr;  // the model's kernel table's row for `type`
  int64_t rows = 0, cols = 0;
  size_t stride = 0;
  Buffer data;
};

struct Layer {
  std::vector<float> attn_norm;  // (dim)
  Matrix attn_q;                 // (n_heads * head_dim, dim)
  Matrix attn_k;                 // (n_kv_heads * head_dim, dim)
  Matrix attn_v;                 // (n_kv_heads * head_dim, dim)
  Matrix attn_output;            // (dim, n_heads * head_dim)
  std::vector<float> ffn_norm;   // (dim)
  Matrix ffn_gate;               // (ffn_dim, dim)
  Matrix ffn_up;                 // (ffn_dim, dim)
  Matrix ffn_down;               // (dim, ffn_dim)
};

// The attention KV cache: keys and values of every sequence slot, layer, KV head and
// position, each (n_slots, n_layers, n_kv_heads, n_ctx, head_dim) elements of one type (F16 or
// F32). Every slot has the whole n_ctx, allocated once (docs/design.md, "Sequence slots").
class KvCache {
 public:
  KvCache() = default;
  KvCache(int64_t n_slots, int64_t n_layers, int64_t n_kv_heads, int64_t n_ctx, int64_t head_dim,
          GgmlType type);

  GgmlType type() const { return type_; }
  size_t row_bytes() const { return row_bytes_; }  // one position of one head: (head_dim)
  // Address of the key / value row of (slot, layer, kv head, position); rows of consecutive
  // positions follow each other, row_bytes() apart.
  uint8_t* k(int64_t slot, int64_t layer, int64_t head, int64_t pos) {
    return k_.data() + offset(slot, layer, head, pos);
  }
  uint8_t* v(int64_t slot, int64_t layer, int64_t head, int64_t pos) {
    return v_.data() + offset(slot, layer, head, pos);
  }
  size_t bytes() const { return k_.size() + v_.size(); }
  // Positions [0, n_pos) of slot 0's layers and heads as bytes (all keys, then all values),
  // and back.
  std::vector<uint8_t> save(int64_t n_pos);
  void load(const uint8_t* data, size_t nbytes, int64_t n_pos);

 private:
  size_t offset(int64_t slot, int64_t layer, int64_t head, int64_t pos) const {
    return (((size_t(slot) * n_layers_ + size_t(layer)) * n_kv_heads_ + size_t(head)) * n_ctx_ +
            size_t(pos)) * row_bytes_;
  }
  int64_t n_slots_ = 0, n_layers_ = 0, n_kv_heads_ = 0, n_ctx_ = 0;
  GgmlType type_ = GgmlType::F32;
  size_t row_bytes_ = 0;
  Buffer k_, v_;  // (n_slots, n_layers, n_kv_heads, n_ctx, head_dim) each
};

class Model {
 public:
  Model(const HParams& hp, const std::map<std::string, TensorIn>& tensors, int64_t n_ctx,
        int n_threads, bool kv_f16, const KernelTable* kernels, int64_t n_slots = 1);

  // Runs tokens[0..n) at positions start_pos.. of slot 0 and writes logits (n_vocab floats per
  // row) for the last token, or for every token when all_logits. Positions >= start_pos are
  // overwritten.
  void forward(const int32_t* tokens, int64_t n, int64_t start_pos, bool all_logits,
               float* logits);

  // Runs a batch whose tokens belong to several sequences: token i is at position pos[i] of
  // slot seq[i]. A sequence's tokens are one run of consecutive entries with consecutive
  // positions, starting at most at the slot's length (starting before it rewinds the slot);
  // each token attends only to its own slot's positions up to its own. For every i with
  // want[i], in order, writes n_vocab logits (or, when hidden, the dim floats of the final
  // normed hidden state) to out. Every float reduction of a token runs in the same order
  // whatever else is in the batch, so a sequence's results do not depend on its neighbours.
  void forward_seqs(const int32_t* tokens, const int32_t* seq, const int64_t* pos, int64_t n,
                    const uint8_t* want, bool hidden, float* out);
  // Positions a slot holds (set by the last batch that wrote it), and setting it back.
  int64_t slot_length(int64_t slot) const;
  void rewind_slot(int64_t slot, int64_t n_pos);  // keep positions [0, n_pos); 0 clears
  int64_t n_slots() const { return n_slots_; }

  // The KV cache of positions [0, n_pos) as bytes, and back (for save/load of a session).
  std::vector<uint8_t> save_kv(int64_t n_pos);
  void load_kv(const uint8_t* data, size_t nbytes, int64_t n_pos);

  const HParams& hparams() const { return hp_; }
  int64_t n_ctx() const { return n_ctx_; }
  int n_threads() const { return pool_.size(); }
  const char* isa() const { return k_->name; }
  size_t kv_cache_bytes() const { return kv_.bytes(); }
  size_t weight_bytes() const { return weight_bytes_; }

  static constexpr int64_t kMaxBatch = 512;  // tokens per internal batch; longer inputs loop

 private:
  Matrix load_matrix(const std::map<std::string, TensorIn>& tensors, const std::string& name,
                     int64_t rows, int64_t cols);
  // Tokens [base, base + n) of a batch: positions start_pos.. of one slot.
  struct SeqRun {
    int64_t slot, start_pos, base, n;
  };
  // The forward pass of up to kMaxBatch tokens made of runs (at most one per slot). Writes
  // out_rows' logits, or their normed hidden states when hidden.
  void forward_batch(const int32_t* tokens, int64_t n, const SeqRun* runs, int64_t n_runs,
                     const int64_t* out_rows, int64_t n_out, bool hidden, float* out);
  void check_slot(int64_t slot, const char* what) const;
  struct MatmulJob {
    const Matrix* w;
    float* out;          // (n_tok, out_stride)
    int64_t out_stride;
  };
  // out = x @ w.T for every job; x (n_tok, x_stride) is quantized once per activation format
  // and all jobs' row chunks run in one parallel region (Q|K|V and gate|up fused).
  void matmuls(const float* x, int64_t n_tok, int64_t x_stride, std::initializer_list<MatmulJob> jobs);
  // How one layer's attention is split into tasks (decided in Model::attention).
  struct AttentionPlan {
    int64_t layer, slot, base, n, start_pos;  // tokens [base, base + n) of the batch
    int64_t group;          // query heads per KV head
    int64_t tpt;            // tokens per block of queries (tokens_per_attention_task)
    int64_t n_parts;        // parts of kPartPositions positions its last token sees
    int64_t n_part_groups;  // > 1: a decode step whose parts are spread over that many tasks
    size_t part_row0;       // this run's region of part_o_ / part_log_sum_ (rows)
  };
  // att = softmax(q k^T / sqrt(head_dim)) v for the batch, causal within each run's slot,
  // each query's positions in fixed parts whose softmaxes are folded in order: a token's
  // result depends on its position and its slot's cache only.
  void attention(int64_t layer, const SeqRun* runs, int64_t n_runs);
  void load_queries(const AttentionPlan& p, int64_t t0, int64_t nt, int64_t g, float* qbuf) const;
  // One part of the positions for the queries of tokens [t0, t0 + nt) sharing KV head g:
  // outputs (nt * group, head_dim) and softmax normalizers (nt * group).
  void attend_one_part(const AttentionPlan& p, int64_t t0, int64_t nt, int64_t g, int64_t part,
                       const float* qbuf, int thread, float* out, float* log_sum);
  // One task: the block of tokens from t0, KV head g, all its parts folded into att_.
  void attend_block(const AttentionPlan& p, int64_t t0, int64_t g, int thread);
  // One task of a spread decode step: part group pg of KV head g into part_o_/part_log_sum_.
  void attend_part_group(const AttentionPlan& p, int64_t g, int64_t pg, int thread);
  // att_ of a spread decode step: its parts folded in order, as attend_block folds them.
  void merge_parts(const AttentionPlan& p);
  void round_to_f16(float* x, int64_t n) const;
  void rope(float* v, int64_t n_heads_here, int64_t pos) const;
  void embed(int32_t token, float* out);

  HParams hp_;
  int64_t n_ctx_;
  int64_t n_slots_;
  std::vector<int64_t> slot_len_;  // (n_slots) positions each slot holds
  const KernelTable* k_;
  const TypeKernels& f16_;  // fp16 rows to/from float (round_to_f16)
  ThreadPool pool_;
  std::mutex forward_mutex_;  // one forward at a time per model
  size_t weight_bytes_ = 0;

  Matrix token_embd;           // (n_vocab, dim)
  std::vector<Layer> layers;
  std::vector<float> output_norm;  // (dim)
  Matrix output;                   // (n_vocab, dim); rows == 0 when tied to token_embd
  std::vector<double> inv_freq_;   // (n_rot / 2) RoPE frequencies, RoPE scaling applied

  KvCache kv_;
  const TypeKernels& kv_kernels_;  // the cache's element type: float rows into it

  // Activations for one batch of up to kMaxBatch tokens, allocated once.
  Scratch x_;        // (batch, dim) residual stream
  Scratch xb_;       // (batch, dim) normed input of a sublayer
  Scratch q_;        // (batch, n_heads * head_dim)
  Scratch k_cur_;    // (batch, n_kv_heads * head_dim)
  Scratch v_cur_;    // (batch, n_kv_heads * head_dim)
  Scratch att_;      // (batch, n_heads * head_dim) attention output
  Scratch proj_;     // (batch, dim) output of attn_output / ffn_down
  Scratch gate_;     // (batch, ffn_dim)
  Scratch up_;       // (batch, ffn_dim)
  // Activations in each vec_dot_type (TypeTraits) the weights need, indexed by type id:
  // (batch, max(dim, ffn_dim, q_dim)) in that type; empty for the types no weight uses and
  // for F32 (the float activations themselves).
  std::vector<Buffer> act_;
  // (batch, blocks) act_block_info of act_[type], for the block types with such info (Q8_0, Q8_1)
  std::vector<std::vector<ActBlockInfo>> act_info_;
  struct Chunk {  // a slice of rows of one matmul job: the unit of work of matmuls()
    const MatmulJob* job;
    int64_t r0, n_rows;
  };
  std::vector<Chunk> chunks_;
  // Attention scratch per thread: one task's queries (max_q, head_dim), their scores for one
  // part (max_q, kPartPositions), a part's outputs and the folded outputs (max_q, head_dim),
  // and per query the part's normalizer, the running top and total (3, max_q).
  Scratch attn_q_, scores_, attn_o_, attn_acc_, attn_norm_;
  // A decode step spread over tasks (Model::attention): every part's outputs (group,
  // head_dim) and normalizers (group), per (kv head, part); a region of part_rows_per_run_
  // rows per run, n_slots regions.
  Scratch part_o_, part_log_sum_;
  size_t part_rows_per_run_ = 0;
  std::vector<uint8_t> embd_row_;  // one token_embd row back in GGML layout
  // One batch's layout, allocated once: (batch) position and slot of each token, its runs,
  // the rows whose logits are wanted, and the attention tasks (plan, first token, kv head).
  std::vector<int64_t> tok_pos_, tok_slot_, out_rows_;
  std::vector<SeqRun> runs_;
  struct AttentionTask {
    const AttentionPlan* plan;
    int64_t t0, part_group;  // part_group -1: a block of tokens from t0 (attend_block)
  };
  std::vector<AttentionPlan> plans_;
  std::vector<AttentionTask> tasks_;
};

}  // namespace alpaca
