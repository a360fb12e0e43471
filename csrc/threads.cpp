#include "threads.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#endif
#if defined(__linux__)
#include <dirent.h>
#include <fcntl.h>
#include <sched.h>
#include <unistd.h>
#endif

namespace locdiff {

int threads_for_load(int team, int cpus, int online, int runnable, int own_runnable) {
  team = std::max(team, 1);
  cpus = std::max(cpus, 1);
  online = std::max(online, cpus);
  const long others = std::max(0, runnable - std::max(own_runnable, 1));  // we run: at least 1 is ours
  const long on_ours = (others * cpus + online / 2) / online;              // their share of our cores
  return (int)std::clamp<long>(cpus - on_ours, 1, team);
}

#if defined(__linux__)
namespace {

// Reads a small /proc file into buf (NUL-terminated); false if it cannot.
bool read_small(const char* path, char* buf, size_t size) {
  const int fd = ::open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  const ssize_t n = ::read(fd, buf, size - 1);
  ::close(fd);
  if (n <= 0) return false;
  buf[n] = '\0';
  return true;
}

// Threads runnable machine-wide: "0.50 0.40 0.30 3/250 12345" -> 3.
int runnable_threads() {
  char buf[128];
  if (!read_small("/proc/loadavg", buf, sizeof buf)) return -1;
  const char* p = buf;
  for (int field = 0; field < 3 && p; ++field) p = std::strchr(p + 1, ' ');
  return p ? std::atoi(p + 1) : -1;
}

// Our own threads in state R (running or waiting for a core), from /proc/self/task/*/stat.
int own_runnable_threads() {
  DIR* dir = ::opendir("/proc/self/task");
  if (!dir) return 1;
  int count = 0;
  char path[64], buf[512];
  while (const dirent* e = ::readdir(dir)) {
    if (e->d_name[0] == '.') continue;
    std::snprintf(path, sizeof path, "/proc/self/task/%.20s/stat", e->d_name);
    if (!read_small(path, buf, sizeof buf)) continue;
    const char* close_paren = std::strrchr(buf, ')');  // "tid (comm) S ...": comm may hold spaces
    if (close_paren && close_paren[1] == ' ' && close_paren[2] == 'R') ++count;
  }
  ::closedir(dir);
  return std::max(count, 1);
}

long long now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

int affinity_cpus() {
  cpu_set_t set;
  if (::sched_getaffinity(0, sizeof set, &set) != 0) return 0;
  return CPU_COUNT(&set);
}

}  // namespace
#endif

namespace {
std::atomic<bool> forked_child{false};
#if defined(__unix__) || defined(__APPLE__)
void mark_forked_child() { forked_child.store(true, std::memory_order_relaxed); }
// Registered when the module loads; a child of a child is a child too (the flag is inherited).
const int atfork_registered = ::pthread_atfork(nullptr, nullptr, mark_forked_child);
#endif
}  // namespace

bool in_forked_child() { return forked_child.load(std::memory_order_relaxed); }

int region_threads() {
#ifdef _OPENMP
  if (in_forked_child()) return 1;
  const int team = omp_get_max_threads();
  if (team <= 1 || omp_in_parallel()) return std::max(team, 1);
#if defined(__linux__)
  // The free cores, sampled at most every 5 ms (or 100x a sample's cost, for processes with many
  // threads); the answer is the most free cores of the last three samples, so that a thread runnable
  // for an instant does not halve an idle machine's threads, while a lasting load is seen within three
  // samples.  Races between callers only repeat or skip a sample.
  static std::atomic<long long> next_sample_ns{0};
  static std::atomic<int> recent[3];  // free cores of the last three samples; 0 = none or unknown
  static std::atomic<unsigned> slot{0};
  static const int online = (int)std::max(1L, ::sysconf(_SC_NPROCESSORS_ONLN));
  const long long now = now_ns();
  if (now >= next_sample_ns.load(std::memory_order_relaxed)) {
    next_sample_ns.store(now + 5'000'000, std::memory_order_relaxed);
    const int cpus = affinity_cpus(), runnable = runnable_threads();
    int sample = 0;
    if (cpus > 0 && runnable >= 0) {
      const int own = runnable > 1 ? own_runnable_threads() : 1;
      sample = threads_for_load(1 << 20, cpus, online, runnable, own);  // the free cores (no team cap)
    }
    recent[slot.fetch_add(1, std::memory_order_relaxed) % 3].store(sample, std::memory_order_relaxed);
    next_sample_ns.store(now + std::max(5'000'000LL, 100 * (now_ns() - now)), std::memory_order_relaxed);
  }
  int most = 0;
  for (auto& r : recent) {
    const int v = r.load(std::memory_order_relaxed);
    if (v == 0) return team;  // fewer than three samples yet, or one unknown
    most = std::max(most, v);
  }
  return std::min(team, most);
#else
  return team;
#endif
#else
  return 1;
#endif
}

}  // namespace locdiff
