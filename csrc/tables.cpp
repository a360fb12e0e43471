#include "tables.h"

#include <algorithm>
#include <cmath>
#include <mutex>

namespace locdiff {

std::shared_ptr<const HostTables> host_tables(int L) {
  static std::mutex mutex;
  static std::shared_ptr<const HostTables> cached;
  std::lock_guard<std::mutex> lock(mutex);
  if (cached && cached->L >= L) return cached;
  // Grow geometrically (but never past the supported maximum) so a sweep over L builds few tables.
  const int target = std::min(kMaxDegree, std::max(L, cached ? 2 * cached->L : std::max(L, 64)));
  auto t = std::make_shared<HostTables>();
  const size_t n = (size_t)tri(target + 1, 0);
  t->a.resize(n);
  t->b.resize(n);
  t->e.resize(n);
  t->sect.resize(target + 1);
  t->logsect.resize(target + 1);
  fill_tables(target, t->a.data(), t->b.data(), t->e.data(), t->sect.data(), t->logsect.data());
  t->alpha.resize(n);
  t->beta.resize(n);
  for (int l = 0; l <= target; ++l)
    for (int m = 0; m <= l; ++m) {
      t->alpha[tri(l, m)] = 0.5 * std::sqrt((double)(l + m) * (l - m + 1));
      t->beta[tri(l, m)] = 0.5 * std::sqrt((double)(l + m + 1) * (l - m));
    }
  t->L = target;
  cached = t;
  return cached;
}

}  // namespace locdiff
