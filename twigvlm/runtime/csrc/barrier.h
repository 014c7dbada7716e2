/* A barrier for the threads of one OpenMP parallel region that spins for a few microseconds and then sleeps.
 *
 * The native layers meet at about nine barriers a layer (270 a decode step of a 30-layer decoder). libgomp's own
 * barrier spins for up to 300,000 rounds before it sleeps (GOMP_SPINCOUNT, read once when torch loads it): on idle
 * cores a barrier is over within a microsecond or two and spinning is right, but when another process holds one of
 * the cores, the thread that arrived first burns its core for milliseconds while its partner waits for a turn, at
 * every barrier. Measured on a 2-core CPU with one busy process beside a demo decode: 3× slower than on idle cores;
 * with a 2-thread torch job beside it, 4–40×. Here a waiting thread spins for at most twig_spin_ns, then sleeps on
 * a futex (Linux; elsewhere it yields its core), so a thread that waits long gives its core to the one it waits for.
 *
 * Sense-reversing: `phase` counts completed barriers; the last thread to arrive resets `arrived`, advances `phase`
 * and wakes the sleepers, if any. Every atomic here is sequentially consistent, so a sleeper either sees the new
 * phase before it sleeps or is counted in `sleepers` before the last thread looks (no lost wake-up).
 */
#ifndef TWIG_BARRIER_H
#define TWIG_BARRIER_H

#include <stdatomic.h>
#include <time.h>

#ifdef __linux__
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#else
#include <sched.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define TWIG_RELAX() _mm_pause()
#else
#define TWIG_RELAX() ((void)0)
#endif

/* How long a waiting thread spins before it sleeps: 20 µs, longer than an idle machine's waits between phases and
 * short beside a time slice (`twig_set_spin_ns` changes it: tests take 0 to sleep at every barrier). */
static atomic_llong twig_spin_ns = 20000;
static atomic_llong twig_sleeps; /* how many times a waiting thread went to sleep, in all */

typedef struct {
  atomic_int arrived;  /* threads at the current barrier */
  atomic_int phase;    /* barriers completed (the futex word) */
  atomic_int sleepers; /* threads asleep (or about to be) on `phase` */
  int nt;              /* the region's threads */
} twig_barrier;

static void twig_barrier_init(twig_barrier *b, int nt) {
  atomic_init(&b->arrived, 0);
  atomic_init(&b->phase, 0);
  atomic_init(&b->sleepers, 0);
  b->nt = nt;
}

static inline long long twig_now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void twig_sleep_on(atomic_int *word, int seen) {
#ifdef __linux__
  syscall(SYS_futex, (int *)word, FUTEX_WAIT_PRIVATE, seen, NULL, NULL, 0); /* returns at once if *word != seen */
#else
  (void)word, (void)seen;
  sched_yield();
#endif
}

static void twig_wake_all(atomic_int *word) {
#ifdef __linux__
  syscall(SYS_futex, (int *)word, FUTEX_WAKE_PRIVATE, 0x7fffffff, NULL, NULL, 0);
#else
  (void)word;
#endif
}

static void twig_barrier_wait(twig_barrier *b) {
  if (b->nt <= 1) return;
  const int phase = atomic_load(&b->phase);
  if (atomic_fetch_add(&b->arrived, 1) == b->nt - 1) { /* the last one in */
    atomic_store(&b->arrived, 0);
    atomic_store(&b->phase, phase + 1);
    if (atomic_load(&b->sleepers) > 0) twig_wake_all(&b->phase);
    return;
  }
  const long long spin = atomic_load_explicit(&twig_spin_ns, memory_order_relaxed);
  const long long until = spin ? twig_now_ns() + spin : 0;
  for (int round = 1; spin; ++round) { /* (the clock read every 64 rounds) */
    if (atomic_load(&b->phase) != phase) return;
    TWIG_RELAX();
    if (round % 64 == 0 && twig_now_ns() > until) break;
  }
  atomic_fetch_add(&b->sleepers, 1);
  atomic_fetch_add_explicit(&twig_sleeps, 1, memory_order_relaxed);
  while (atomic_load(&b->phase) == phase) twig_sleep_on(&b->phase, phase);
  atomic_fetch_sub(&b->sleepers, 1);
}

#endif
