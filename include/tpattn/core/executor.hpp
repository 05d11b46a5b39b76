// tpattn/core/executor.hpp -- who runs parallel work: an interface an engine implements over its
// own threads, and a default pool.
//
// tpattn never creates threads on its own. A call that can use several cores takes an
// Executor*; null runs everything on the calling thread. The executor is asked for one thing:
// run tasks 0 .. n-1, each exactly once, and return when all have returned. The driver
// (kernels/attention_driver.hpp) hands out its work items to those tasks itself, so an
// executor needs no notion of items, thread ids or load balance.
#pragma once

#include <memory>

#include "tpattn/core/eigen.hpp"  // Eigen::ThreadPool, Eigen::Barrier
#include "tpattn/core/error.hpp"
#include "tpattn/core/storage_type.hpp"

namespace tpattn {

// A non-owning reference to a callable `void(Index task)`: two pointers, so passing it on
// never allocates. The callable must outlive every call through the reference.
class TaskRef {
 public:
  template <class Task>
  explicit TaskRef(Task& task)
      : task_(&task), call_([](void* t, Index i) { (*static_cast<Task*>(t))(i); }) {}
  void operator()(Index task) const { call_(task_, task); }

 private:
  void* task_;
  void (*call_)(void*, Index);
};

class Executor {
 public:
  virtual ~Executor() = default;

  // How many tasks can make progress at once (>= 1); plans size their work for this many.
  virtual Index concurrency() const = 0;

  // Runs task(0) .. task(tasks - 1), each once, and returns after every one has returned. tasks
  // may exceed concurrency() (the rest wait their turn). The tasks tpattn gives never throw (the
  // driver catches inside each and rethrows on the calling thread). An implementation must not
  // allocate per call if the caller is to keep the no-allocation guarantee of a decode step.
  virtual void run(Index tasks, TaskRef task) = 0;
};

// The default executor: `threads` threads in all, the calling thread being one of them (it runs
// task 0 and waits for the rest), the others kept in an Eigen ThreadPool that lives as long as
// this object. Nothing is created per call. One run() at a time per pool: calls from several
// threads into one ThreadPool must be serialised by the caller, and a task must not call run()
// on its own pool (its workers may all be waiting on the outer run).
class ThreadPool final : public Executor {
 public:
  explicit ThreadPool(Index threads) : threads_(threads) {
    TPATTN_CHECK(threads >= 1 && threads <= 4096, "ThreadPool", "threads", "in [1, 4096]", threads);
    if (threads > 1) pool_ = std::make_unique<Eigen::ThreadPool>(static_cast<int>(threads - 1));
  }

  Index concurrency() const override { return threads_; }

  void run(Index tasks, TaskRef task) override {
    if (tasks <= 0) return;
    if (pool_ == nullptr || tasks == 1) {
      for (Index i = 0; i < tasks; ++i) task(i);
      return;
    }
    Eigen::Barrier done(static_cast<unsigned int>(tasks - 1));
    Shared shared{&done, task};
    for (Index i = 1; i < tasks; ++i) {
      // Two pointers' worth of capture, so std::function keeps it inline: no allocation.
      Shared* s = &shared;
      pool_->Schedule([s, i] {
        s->task(i);
        s->done->Notify();
      });
    }
    task(0);
    done.Wait();
  }

 private:
  struct Shared {
    Eigen::Barrier* done;
    TaskRef task;
  };

  Index threads_;
  std::unique_ptr<Eigen::ThreadPool> pool_;
};

// Runs tasks on `executor`, or one after another on the calling thread when it is null.
inline void run_tasks(Executor* executor, Index tasks, TaskRef task) {
  if (executor == nullptr) {
    for (Index i = 0; i < tasks; ++i) task(i);
  } else {
    executor->run(tasks, task);
  }
}

// Cuts [0, count) into at most executor->concurrency() contiguous ranges of whole `grain`s and
// calls range(begin, end) for each, one task per range (null executor: one range, the calling
// thread). For loops whose iterations write disjoint outputs, e.g. the output features of a
// projection. range must not throw.
template <class Range>
void parallel_ranges(Executor* executor, Index count, Index grain, Range&& range) {
  const Index grains = (count + grain - 1) / grain;
  const Index threads = executor == nullptr ? 1 : executor->concurrency();
  const Index tasks = threads < grains ? threads : grains;
  if (executor == nullptr || tasks <= 1) {
    if (count > 0) range(Index{0}, count);
    return;
  }
  auto task = [&](Index t) {
    const Index begin = grains * t / tasks * grain;
    const Index end = grains * (t + 1) / tasks * grain;
    if (begin < end) range(begin, end < count ? end : count);
  };
  executor->run(tasks, TaskRef(task));
}

}  // namespace tpattn
