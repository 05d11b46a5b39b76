// examples/engine_integration.cpp -- tpattn inside an inference engine's own memory and threads.
//
// (a) EngineCache: the KvCache interface over a page pool the engine owns;
// (b) EngineThreads: tpattn's Executor over the engine's own std::thread pool;
// (c) a ragged batch: sequences of 5, 37 and 70 tokens decoded in one call;
// (d) speculative decoding: draft tokens decoded, the rejected ones cut off with truncate();
// (e) a shared prefix cache and a private suffix cache, attended apart by the bare kernel and
//     merged by log-sum-exp, against one cache holding both.
// Exits 1 if a check fails, so its CTest run is a test.
#include <cmath>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "tpattn/tpattn.hpp"

using tpattn::Index;
using tpattn::RowMatrix;
using tpattn::SequenceId;

namespace {

// (a) The engine's memory: pages of page_bytes bytes, allocated once and handed out by a free
// list that never grows past its first size. tpattn never allocates or copies it.
struct PagePool {
  PagePool(Index page_bytes, Index pages)
      : page_bytes(page_bytes), memory(static_cast<std::size_t>(pages * page_bytes)) {
    for (Index p = 0; p < pages; ++p) free.push_back(memory.data() + p * page_bytes);
  }
  Index page_bytes;
  std::vector<std::byte> memory;
  std::vector<std::byte*> free;
};

// The KvCache interface over a PagePool (several caches may share one): a sequence's page b
// holds its tokens [b T, (b + 1) T) of every plane, plane p from byte offsets_[p] as
// [T, rows, cols], which is all a SequenceView asks. Every check comes before any change, so a
// misuse throws tpattn::Error and leaves the cache as it was; append, truncate and view
// allocate nothing (each page table is reserved up front).
class EngineCache final : public tpattn::KvCache {
 public:
  EngineCache(tpattn::CacheRecord record, PagePool& pool, Index page_tokens, Index max_sequences)
      : KvCache(std::move(record)),
        pool_(pool),
        page_tokens_(page_tokens),
        slots_(static_cast<std::size_t>(max_sequences)) {
    TPATTN_CHECK(page_tokens >= 1 && page_tokens * bytes_per_token() <= pool.page_bytes,
                 "EngineCache", "page_tokens", "pages that fit the pool's", page_tokens);
    for (Index p = 0, offset = 0; p < this->record().plane_count(); ++p) {
      offsets_.push_back(offset);
      offset += page_tokens * this->record().plane(p).bytes_per_token();
    }
    for (Slot& slot : slots_) slot.pages.reserve(pool.free.size());  // room for every page
  }
  ~EngineCache() override {
    for (Slot& slot : slots_)
      pool_.free.insert(pool_.free.end(), slot.pages.begin(), slot.pages.end());
  }

  SequenceId add_sequence() override {
    for (SequenceId seq = 0; seq < max_sequences(); ++seq)
      if (!contains(seq)) {
        slot(seq, "add_sequence", false).live = true;
        return seq;
      }
    throw tpattn::Error("EngineCache::add_sequence", "sequence count",
                        "at most " + std::to_string(max_sequences()) + " live sequences",
                        std::to_string(max_sequences() + 1));
  }
  void remove_sequence(SequenceId seq) override {
    Slot& s = slot(seq, "remove_sequence");
    truncate(seq, 0);  // gives its pages back
    s.live = false;
  }
  bool contains(SequenceId seq) const override {
    return seq >= 0 && seq < max_sequences() && slots_[static_cast<std::size_t>(seq)].live;
  }
  Index sequence_count() const override {
    Index count = 0;
    for (const Slot& slot : slots_) count += slot.live;
    return count;
  }
  Index max_sequences() const override { return static_cast<Index>(slots_.size()); }
  Index length(SequenceId seq) const override { return slot(seq, "length").length; }

  void append(SequenceId seq, Index n, const tpattn::PlaneInput* planes, Index count) override {
    const char* call = "EngineCache::append";
    Slot& s = slot(seq, "append");
    const Index room = tokens_available(seq);
    TPATTN_CHECK(n >= 1 && n <= room, call, "n_tokens", "in [1, " + std::to_string(room) + "]", n);
    TPATTN_CHECK(planes && count == record().plane_count(), call, "planes", "one per plane", count);
    for (Index p = 0; p < count; ++p) {
      const tpattn::PlaneSpec& spec = record().plane(p);
      TPATTN_CHECK(planes[p].data && planes[p].rows == spec.rows && planes[p].cols == spec.cols,
                   call, "planes", "plane " + spec.name + ": data of the record's shape",
                   std::to_string(planes[p].rows) + " x " + std::to_string(planes[p].cols));
    }
    for (Index t = 0; t < n; ++t, ++s.length) {
      if (s.length % page_tokens_ == 0) {  // a new page, from the engine's pool
        s.pages.push_back(pool_.free.back());
        pool_.free.pop_back();
      }
      for (Index p = 0; p < count; ++p) {
        const tpattn::PlaneSpec& spec = record().plane(p);
        std::byte* row = s.pages.back() + offsets_[static_cast<std::size_t>(p)] +
                         s.length % page_tokens_ * spec.bytes_per_token();
        tpattn::store_as(spec.storage, planes[p].data + t * spec.elements_per_token(), row,
                         spec.elements_per_token());
      }
    }
    tokens_ += n;
  }
  using KvCache::append;

  void truncate(SequenceId seq, Index new_length) override {
    Slot& s = slot(seq, "truncate");
    TPATTN_CHECK(new_length >= 0 && new_length <= s.length, "EngineCache::truncate", "new_length",
                 "in [0, " + std::to_string(s.length) + "]", new_length);
    tokens_ -= s.length - new_length;
    s.length = new_length;
    const Index keep = (new_length + page_tokens_ - 1) / page_tokens_;  // pages still needed
    for (; static_cast<Index>(s.pages.size()) > keep; s.pages.pop_back())
      pool_.free.push_back(s.pages.back());
  }
  Index tokens_available(SequenceId seq) const override {
    const Slot& s = slot(seq, "tokens_available");
    return static_cast<Index>(s.pages.size() + pool_.free.size()) * page_tokens_ - s.length;
  }
  tpattn::SequenceView view(SequenceId seq) const override {
    const Slot& s = slot(seq, "view");
    return tpattn::SequenceView(&record(), s.pages.data(), offsets_.data(), page_tokens_, s.length);
  }
  Index bytes_used() const override { return tokens_ * bytes_per_token(); }
  Index bytes_reserved() const override {  // the pages this cache's sequences hold
    Index pages = 0;
    for (const Slot& slot : slots_) pages += static_cast<Index>(slot.pages.size());
    return pages * pool_.page_bytes;
  }

 private:
  struct Slot {
    bool live = false;
    Index length = 0;
    std::vector<std::byte*> pages;  // the sequence's page table, in token order
  };
  // The slot of a live sequence (of any, live = false); the call's name is built only for
  // the error, so the happy path allocates nothing.
  Slot& slot(SequenceId seq, const char* call, bool live = true) {
    TPATTN_CHECK(!live || contains(seq), (std::string("EngineCache::") + call).c_str(), "seq",
                 "a live sequence id", seq);
    return slots_[static_cast<std::size_t>(seq)];
  }
  const Slot& slot(SequenceId seq, const char* call) const {
    return const_cast<EngineCache*>(this)->slot(seq, call);
  }

  PagePool& pool_;
  Index page_tokens_;  // T
  std::vector<Slot> slots_;
  std::vector<Index> offsets_;  // [plane_count] byte offset of each plane in a page
  Index tokens_ = 0;
};

// (b) The engine's threads. tpattn asks one thing: run tasks 0 .. n-1, each once, and return
// when all are done. The calling thread takes tasks too; nothing is allocated per run.
class EngineThreads final : public tpattn::Executor {
 public:
  explicit EngineThreads(Index threads) {
    for (Index i = 1; i < threads; ++i) workers_.emplace_back([this] { work(); });
  }
  ~EngineThreads() override {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    changed_.notify_all();
    for (std::thread& worker : workers_) worker.join();
  }
  Index concurrency() const override { return static_cast<Index>(workers_.size()) + 1; }
  void run(Index tasks, tpattn::TaskRef task) override {
    std::unique_lock<std::mutex> lock(mutex_);
    task_ = &task;
    next_ = 0;
    tasks_ = unfinished_ = tasks;
    ++round_;
    changed_.notify_all();  // wakes the workers
    take_tasks(lock);
    changed_.wait(lock, [this] { return unfinished_ == 0; });
  }

 private:
  // Runs tasks of the current round until none is left; entered and left holding the lock.
  void take_tasks(std::unique_lock<std::mutex>& lock) {
    while (next_ < tasks_) {
      const Index i = next_++;
      tpattn::TaskRef* task = task_;  // stays valid: run() waits for this task to finish
      lock.unlock();
      (*task)(i);
      lock.lock();
      if (--unfinished_ == 0) changed_.notify_all();
    }
  }
  void work() {
    std::unique_lock<std::mutex> lock(mutex_);
    for (std::uint64_t seen = 0;; seen = round_) {
      changed_.wait(lock, [&] { return stop_ || round_ != seen; });
      if (stop_) return;
      take_tasks(lock);
    }
  }

  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::condition_variable changed_;  // a new round, the last task done, or stop
  tpattn::TaskRef* task_ = nullptr;
  Index next_ = 0, tasks_ = 0, unfinished_ = 0;
  std::uint64_t round_ = 0;
  bool stop_ = false;
};

constexpr Index kModel = 128, kPageTokens = 16;
using Layer = tpattn::TensorProductAttention<float>;  // fp32 storage: tight comparisons below

bool check(bool ok, const char* what) {
  std::printf("  %s: %s\n", ok ? "ok" : "FAILED", what);
  return ok;
}
float relative(const RowMatrix& a, const RowMatrix& b) {
  return (a - b).cwiseAbs().maxCoeff() / b.cwiseAbs().maxCoeff();
}
RowMatrix weight(Index rows, Index cols) {  // random, where an engine loads a checkpoint's
  return RowMatrix::Random(rows, cols) / std::sqrt(static_cast<float>(cols));
}

// (c) Three sequences of 5, 37 and 70 tokens decode one token each in one call on the engine's
// threads. Then each token is rolled back and decoded alone: a batch changes only rounding.
bool ragged_batch(Layer& attention, PagePool& pool, EngineThreads& threads) {
  EngineCache cache(attention.cache_record(), pool, kPageTokens, 3);
  const Index prompts[3] = {5, 37, 70};
  SequenceId seqs[3];
  RowMatrix y(70, kModel), y_batch(3, kModel), y_alone(3, kModel);
  for (Index b = 0; b < 3; ++b) {
    const RowMatrix x = RowMatrix::Random(prompts[b], kModel);
    seqs[b] = cache.add_sequence();
    attention.prefill(cache, seqs[b], prompts[b], x.data(), y.data(), &threads);
  }
  const RowMatrix x = RowMatrix::Random(3, kModel);  // row b: the new token of seqs[b]
  attention.decode(cache, seqs, 3, x.data(), y_batch.data(), &threads);
  for (Index b = 0; b < 3; ++b) {
    cache.truncate(seqs[b], prompts[b]);
    attention.decode(cache, &seqs[b], 1, x.row(b).data(), y_alone.row(b).data(), &threads);
  }
  std::printf("(c) ragged batch of 5, 37, 70 tokens on %td threads: %.1e from decoding alone\n",
              threads.concurrency(), relative(y_batch, y_alone));
  return check(relative(y_batch, y_alone) <= 1e-5f, "batched decode equals one at a time");
}

// (d) The target model decodes k = 4 draft tokens, accepts 1, and truncate() drops the 3
// rejected ones; the corrected token must then give the bits of a cache that never saw them.
// Drafts go through decode one at a time, so each token's factors come from the same product
// in both caches (a k-token verification prefill is the same math, rounded differently).
bool speculative_rollback(Layer& attention, PagePool& pool, EngineThreads& threads) {
  const Index prompt = 29, k = 4, accepted = 1;
  EngineCache cache(attention.cache_record(), pool, kPageTokens, 1);
  EngineCache reference(attention.cache_record(), pool, kPageTokens, 1);
  const SequenceId seq = cache.add_sequence(), ref = reference.add_sequence();
  const RowMatrix x = RowMatrix::Random(prompt, kModel), drafts = RowMatrix::Random(k, kModel);
  const RowMatrix corrected = RowMatrix::Random(1, kModel);
  RowMatrix y(prompt, kModel), y_spec(1, kModel), y_ref(1, kModel);
  attention.prefill(cache, seq, prompt, x.data(), y.data(), &threads);
  attention.prefill(reference, ref, prompt, x.data(), y.data(), &threads);
  for (Index t = 0; t < k; ++t)
    attention.decode(cache, &seq, 1, drafts.row(t).data(), y.data(), &threads);
  for (Index t = 0; t < accepted; ++t)
    attention.decode(reference, &ref, 1, drafts.row(t).data(), y.data(), &threads);
  const Index drafted = cache.length(seq);
  cache.truncate(seq, drafted - (k - accepted));
  attention.decode(cache, &seq, 1, corrected.data(), y_spec.data(), &threads);
  attention.decode(reference, &ref, 1, corrected.data(), y_ref.data(), &threads);
  const bool same = std::memcmp(y_spec.data(), y_ref.data(), kModel * sizeof(float)) == 0;
  std::printf("(d) %td drafts, %td accepted: length %td -> %td, +1 = %td (reference %td)\n", k,
              accepted, drafted, drafted - (k - accepted), cache.length(seq),
              reference.length(ref));
  return check(same && cache.bytes_used() == reference.bytes_used(),
               "after the rollback, the reference's output bits and bytes_used");
}

// (e) A 45-token system prompt is cached once, to be shared; a request keeps its own 19 tokens.
// The bare kernel attends each cache apart (out and natural-log LSE), merge_partial combines
// the two, and one cache holding all 64 tokens is the reference.
bool prefix_suffix(const tpattn::TpaKernel<float>& kernel, PagePool& pool) {
  const Index prefix = 45, total = 64, h = kernel.shape().heads, dv = kernel.shape().value_dim;
  const tpattn::CacheRecord& record = kernel.cache_record();  // A_K, B_K, A_V, B_V
  // The engine's factors of the 64 tokens, [tokens, rows, cols] per plane, B_K rotated at each
  // token's position (the bare kernel never rotates): random ones stand in here.
  std::vector<RowMatrix> factors;
  for (const tpattn::PlaneSpec& plane : record.planes())
    factors.push_back(RowMatrix::Random(total, plane.elements_per_token()));
  const auto holding = [&](EngineCache& cache, Index first, Index n) {  // tokens [first, +n)
    tpattn::PlaneInput planes[4];
    for (Index p = 0; p < 4; ++p)
      planes[p] = {factors[p].row(first).data(), record.plane(p).rows, record.plane(p).cols};
    const SequenceId seq = cache.add_sequence();
    cache.append(seq, n, planes, 4);
    return cache.view(seq);
  };
  EngineCache shared(record, pool, kPageTokens, 1), own(record, pool, kPageTokens, 1);
  EngineCache whole(record, pool, kPageTokens, 1);
  const tpattn::SequenceView views[3] = {
      holding(shared, 0, prefix), holding(own, prefix, total - prefix), holding(whole, 0, total)};

  // The last token's query, a_q: [R_Q, h], b_q: [R_Q, d_h]. With n = 1 a query sees every token
  // of a view, so it attends the cache of earlier tokens as well as the one holding itself.
  const RowMatrix a_q = RowMatrix::Random(kernel.shape().rank_q, h);
  const RowMatrix b_q = RowMatrix::Random(kernel.shape().rank_q, kernel.shape().head_dim);
  std::vector<float> workspace(static_cast<std::size_t>(kernel.workspace_floats()));
  RowMatrix out[3], lse[3];  // [h, d_v] and [h, 1]: prefix, suffix, all 64 tokens
  for (Index c = 0; c < 3; ++c) {
    out[c].resize(h, dv);
    lse[c].resize(h, 1);
    kernel.attend(a_q.data(), b_q.data(), 1, views[c], out[c].data(), lse[c].data(),
                  workspace.data());
  }
  for (Index i = 0; i < h; ++i)  // head i: the prefix's (out, lse) <- merged with the suffix's
    tpattn::merge_partial(out[0].row(i).data(), &lse[0](i), out[1].row(i).data(), lse[1](i), dv);
  const float out_error = relative(out[0], out[2]), lse_error = relative(lse[0], lse[2]);
  std::printf(
      "(e) prefix 45 + suffix 19 merged vs one cache of 64: max |difference| out %.1e"
      " (relative %.1e), lse %.1e (relative %.1e)\n",
      (out[0] - out[2]).cwiseAbs().maxCoeff(), out_error, (lse[0] - lse[2]).cwiseAbs().maxCoeff(),
      lse_error);
  return check(out_error <= 1e-5f && lse_error <= 1e-5f,
               "merged partial attention equals attention over prefix + suffix (relative)");
}

}  // namespace

int main() {
  tpattn::TpaConfig config;
  config.d_model = kModel;
  config.heads = 8;
  config.head_dim = 16;
  config.rank_q = 4;
  config.rank_k = config.rank_v = 2;
  const Index h = config.heads, dh = config.head_dim;
  tpattn::TpaWeights w;  // A maps head-major, B maps rank-major, as the T6 code stores them
  w.w_a_q = weight(h * config.rank_q, kModel);
  w.w_b_q = weight(config.rank_q * dh, kModel);
  w.w_a_k = weight(h * config.rank_k, kModel);
  w.w_b_k = weight(config.rank_k * dh, kModel);
  w.w_a_v = weight(h * config.rank_v, kModel);
  w.w_b_v = weight(config.rank_v * dh, kModel);
  w.w_o = weight(kModel, h * dh);
  Layer attention(config, w);

  // One pool for every cache below (an engine keeps one per layer), and two threads in all.
  const Index pages = 64;
  PagePool pool(kPageTokens * attention.cache_record().bytes_per_token(), pages);
  EngineThreads threads(2);
  attention.reserve(/*max_batch=*/3, /*max_tokens=*/70, /*threads=*/2);
  bool ok = ragged_batch(attention, pool, threads);
  ok &= speculative_rollback(attention, pool, threads);
  ok &= prefix_suffix(attention.kernel(), pool);
  ok &= check(static_cast<Index>(pool.free.size()) == pages, "every page is back in the pool");
  std::printf(ok ? "all checks passed\n" : "FAILED\n");
  return ok ? 0 : 1;
}
