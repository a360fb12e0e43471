// How many threads a kernel's parallel region uses.  OpenMP's default is every thread of the team
// (torch.set_num_threads), which is right on an idle machine.  When other processes' runnable
// threads already fill the cores (a DataLoader, a second job), a region of several threads waits at
// its end for whichever thread lost its core, and libgomp's spinning waiters make that worse: an
// L = 32 synthesis took 28-48 ms instead of 1.7 ms with two threads under two busy processes on two
// cores, 2.4-2.9 ms with one (BENCHMARKS 1e).  So each region asks region_threads(), which subtracts
// the cores other processes occupy right now.
#pragma once

namespace locdiff {

// The decision itself, pure (tested from Python): `team` threads allowed, `cpus` cores this process
// may run on, `online` cores of the machine, `runnable` threads runnable machine-wide now (the 4th
// field of /proc/loadavg), `own_runnable` of them ours.  Other processes' runnable threads are spread
// over the machine's cores; those landing on ours take them.  Returns a count in [1, team].
int threads_for_load(int team, int cpus, int online, int runnable, int own_runnable);

// Threads for the next parallel region: threads_for_load() on the live counts, sampled at most every
// few milliseconds (~20 us per sample on Linux; elsewhere, and inside a parallel region, the team).
int region_threads();

// True in a child made by fork() (pthread_atfork marks it).  GNU OpenMP is not fork-safe: a child whose
// parent ran a parallel region waits forever in its next one for the parent's threads, which the child does
// not have.  So every kernel region is `if(!in_forked_child())`: in a child it runs on the calling thread
// as an inactive region of one (no pool, no barrier), as PyTorch marks its own pool at fork.
bool in_forked_child();

}  // namespace locdiff
