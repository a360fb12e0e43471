// Host cache of the recurrence tables (built once for the largest L seen, shared by every call).
#pragma once

#include <memory>
#include <vector>

#include "sh_math.h"

namespace locdiff {

struct HostTables {
  std::vector<double> a, b, e, sect, logsect;
  // Ladder coefficients (host only): dPbar_lm/dt = alpha_lm Pbar_{l,m-1} - beta_lm Pbar_{l,m+1},
  // alpha_lm = sqrt((l+m)(l-m+1))/2, beta_lm = sqrt((l+m+1)(l-m))/2; for m = 0, -2 beta_l0 Pbar_l1.
  std::vector<double> alpha, beta;
  int L = -1;
  SHTables view() const { return SHTables{a.data(), b.data(), e.data(), sect.data(), logsect.data(), L}; }
};

// Returns tables valid for at least degree L.  The returned object is immutable and kept alive by
// the shared_ptr, so a concurrent call that grows the cache never frees tables in use.
std::shared_ptr<const HostTables> host_tables(int L);

}  // namespace locdiff
