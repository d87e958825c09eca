// Probe of in-process survival of a dead rank under Open MPI 4.1 + PMIx (issue 15, point 1);
// pmix_survival_probe.py runs it and pins what it shows.
//
// Every rank exchanges a buffer with every live peer for --rounds rounds. At --kill-round the
// victim (the last rank) SIGKILLs itself in the middle of that round's exchange: after its
// receives and before its sends (--kill-at recv: the survivors wait on a receive from a dead
// peer), or after its sends without receiving (--kill-at send: the survivors' sends to it stay
// pending). A survivor learns of the death from a PMIx event handler registered for the
// process-termination statuses ahead of Open MPI's catch-all one (--handler), or from a thread
// that polls the job's process table through PMIx (--poll-ptable). It then cancels its receives from the dead rank, abandons its sends to
// it, never sends to it again, finishes its rounds and finalizes (or exits without finalizing).
// Each rank prints `probe rank=R t=UNIX_S ...` lines.
//
//   pmix_survival_probe [--rounds N] [--kill-round K (-1: nobody dies)] [--elems E] [--handler]
//                       [--poll-ptable] [--kill-at recv|send] [--finalize mpi|exit]
//                       [--stuck-s S] [--finalize-timeout-s S] [--exit-code C]
#include <mpi.h>
#include <pmix.h>
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

namespace {

using Clock = std::chrono::system_clock;

double now_s() {
  return std::chrono::duration<double>(Clock::now().time_since_epoch()).count();
}

int g_rank = -1;
std::atomic<uint64_t> g_dead_mask{0};
std::atomic<int> g_events{0};

void say(const std::string& line) {
  std::printf("probe rank=%d t=%.6f %s\n", g_rank, now_s(), line.c_str());
  std::fflush(stdout);
}

void on_event(size_t /*id*/, pmix_status_t status, const pmix_proc_t* source, pmix_info_t info[],
              size_t ninfo, pmix_info_t* /*results*/, size_t /*nresults*/,
              pmix_event_notification_cbfunc_fn_t cbfunc, void* cbdata) {
  int affected = -1;
  for (size_t i = 0; i < ninfo; ++i) {
    if (std::strcmp(info[i].key, PMIX_EVENT_AFFECTED_PROC) == 0 &&
        info[i].value.type == PMIX_PROC) {
      affected = static_cast<int>(info[i].value.data.proc->rank);
    }
  }
  const int src = source != nullptr ? static_cast<int>(source->rank) : -1;
  const int dead = affected >= 0 ? affected : src;
  if (dead >= 0 && dead < 64 && dead != g_rank) g_dead_mask.fetch_or(uint64_t(1) << dead);
  g_events.fetch_add(1);
  say("event status=" + std::to_string(status) + " name=" + PMIx_Error_string(status) +
      " source=" + std::to_string(src) + " affected=" + std::to_string(affected) +
      " ninfo=" + std::to_string(ninfo));
  // Handled: no later handler (Open MPI's default one calls MPI_Abort) sees this event.
  if (cbfunc != nullptr) cbfunc(PMIX_EVENT_ACTION_COMPLETE, nullptr, 0, nullptr, nullptr, cbdata);
}

// Logs every other event and passes it on to the next handler.
void on_other_event(size_t /*id*/, pmix_status_t status, const pmix_proc_t* source,
                    pmix_info_t* /*info*/, size_t ninfo, pmix_info_t* /*results*/,
                    size_t /*nresults*/, pmix_event_notification_cbfunc_fn_t cbfunc,
                    void* cbdata) {
  say("other_event status=" + std::to_string(status) + " name=" + PMIx_Error_string(status) +
      " source=" + std::to_string(source != nullptr ? int(source->rank) : -1) +
      " ninfo=" + std::to_string(ninfo));
  if (cbfunc != nullptr) cbfunc(PMIX_SUCCESS, nullptr, 0, nullptr, nullptr, cbdata);
}

bool is_dead(int peer) { return (g_dead_mask.load() >> peer) & 1U; }

// Each rank's state in the job's process table (PMIx_Query_info, PMIX_QUERY_PROC_TABLE; mpirun
// answers with an array of pmix_info_t, each holding one pmix_proc_info_t).
std::vector<std::pair<int, pmix_proc_state_t>> proc_states(const pmix_proc_t& me) {
  std::vector<std::pair<int, pmix_proc_state_t>> states;
  pmix_query_t query;
  PMIX_QUERY_CONSTRUCT(&query);
  query.keys = static_cast<char**>(calloc(2, sizeof(char*)));
  query.keys[0] = strdup(PMIX_QUERY_PROC_TABLE);
  PMIX_INFO_CREATE(query.qualifiers, 1);
  query.nqual = 1;
  PMIX_INFO_LOAD(&query.qualifiers[0], PMIX_NSPACE, me.nspace, PMIX_STRING);
  pmix_info_t* results = nullptr;
  size_t n_results = 0;
  if (PMIx_Query_info(&query, 1, &results, &n_results) == PMIX_SUCCESS) {
    for (size_t i = 0; i < n_results; ++i) {
      if (results[i].value.type != PMIX_DATA_ARRAY) continue;
      const pmix_data_array_t* table = results[i].value.data.darray;
      for (size_t k = 0; table->type == PMIX_INFO && k < table->size; ++k) {
        const pmix_value_t& v = static_cast<const pmix_info_t*>(table->array)[k].value;
        if (v.type == PMIX_PROC_INFO) {
          states.emplace_back(static_cast<int>(v.data.pinfo->proc.rank), v.data.pinfo->state);
        }
      }
    }
    PMIX_INFO_FREE(results, n_results);
  }
  PMIX_QUERY_DESTRUCT(&query);
  return states;
}

}  // namespace

int main(int argc, char** argv) {
  int rounds = 20;
  int kill_round = 5;
  size_t elems = 256;
  bool handler = false;
  bool poll_ptable = false;
  std::string kill_at = "recv";  // recv: after receiving, before sending; send: the reverse
  std::string finalize = "mpi";
  double stuck_s = 30;            // a round that long: print `stuck` and exit 3
  double finalize_timeout_s = 0;  // > 0: MPI_Finalize not back that soon: `finalize_hung`, exit 4
  int exit_code = 0;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&] { return i + 1 < argc ? std::string(argv[++i]) : std::string(); };
    if (a == "--rounds") rounds = std::atoi(next().c_str());
    else if (a == "--kill-round") kill_round = std::atoi(next().c_str());
    else if (a == "--elems") elems = std::strtoul(next().c_str(), nullptr, 10);
    else if (a == "--handler") handler = true;
    else if (a == "--poll-ptable") poll_ptable = true;
    else if (a == "--kill-at") kill_at = next();
    else if (a == "--finalize") finalize = next();
    else if (a == "--stuck-s") stuck_s = std::atof(next().c_str());
    else if (a == "--finalize-timeout-s") finalize_timeout_s = std::atof(next().c_str());
    else if (a == "--exit-code") exit_code = std::atoi(next().c_str());
    else {
      std::fprintf(stderr, "pmix_survival_probe: unknown argument %s\n", a.c_str());
      return 2;
    }
  }
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_SERIALIZED, &provided);
  int size = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &g_rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  MPI_Comm comm;
  MPI_Comm_dup(MPI_COMM_WORLD, &comm);
  MPI_Comm_set_errhandler(comm, MPI_ERRORS_RETURN);
  const int victim = size - 1;
  say("start pid=" + std::to_string(getpid()));

  pmix_proc_t me;
  if (handler || poll_ptable) {
    // Open MPI initialised PMIx already; this returns its client.
    const pmix_status_t rc = PMIx_Init(&me, nullptr, 0);
    if (rc != PMIX_SUCCESS) {
      say(std::string("pmix_init_failed ") + PMIx_Error_string(rc));
      return 1;
    }
  }
  if (handler) {
    pmix_status_t rc = PMIX_SUCCESS;
    pmix_status_t codes[] = {PMIX_ERR_PROC_ABORTED,      PMIX_PROC_TERMINATED,
                             PMIX_ERR_PROC_TERM_WO_SYNC, PMIX_EVENT_PROC_TERMINATED,
                             PMIX_ERR_PROC_ABORTED_BY_SIG, PMIX_EVENT_JOB_END,
                             PMIX_ERR_LOST_CONNECTION};
    pmix_info_t first;
    PMIX_INFO_LOAD(&first, PMIX_EVENT_HDLR_FIRST, nullptr, PMIX_BOOL);
    rc = PMIx_Register_event_handler(codes, sizeof(codes) / sizeof(codes[0]), &first, 1, on_event,
                                     nullptr, nullptr);
    say("registered rc=" + std::to_string(rc));
    rc = PMIx_Register_event_handler(nullptr, 0, nullptr, 0, on_other_event, nullptr, nullptr);
    say("registered_default rc=" + std::to_string(rc));
  }
  // --poll-ptable: no event comes, so a thread asks mpirun for the job's process table every
  // 20 ms (what resync's coordinator learns from a closed TCP connection would do as well).
  std::atomic<bool> stop_watch{false};
  std::thread watcher;
  if (poll_ptable) {
    watcher = std::thread([&] {
      while (!stop_watch.load()) {
        for (const auto& [peer, state] : proc_states(me)) {
          if (peer != g_rank && !is_dead(peer) && state > PMIX_PROC_STATE_UNTERMINATED) {
            g_dead_mask.fetch_or(uint64_t(1) << peer);
            say("ptable_gone peer=" + std::to_string(peer) + " state=" + std::to_string(state) +
                " name=" + PMIx_Proc_state_string(state));
          }
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
      }
    });
  }
  MPI_Barrier(comm);

  std::vector<float> out(elems, float(g_rank));
  std::vector<std::vector<float>> in(static_cast<size_t>(size), std::vector<float>(elems));
  for (int round = 0; round < rounds; ++round) {
    std::vector<MPI_Request> recvs(size_t(size), MPI_REQUEST_NULL);
    std::vector<MPI_Request> sends(size_t(size), MPI_REQUEST_NULL);
    const bool victim_round = g_rank == victim && round == kill_round;
    for (int p = 0; p < size; ++p) {
      if (p == g_rank || is_dead(p) || (victim_round && kill_at == "send")) continue;
      MPI_Irecv(in[size_t(p)].data(), int(elems), MPI_FLOAT, p, round, comm, &recvs[size_t(p)]);
    }
    if (victim_round && kill_at == "recv") {
      MPI_Waitall(size, recvs.data(), MPI_STATUSES_IGNORE);
      say("kill round=" + std::to_string(round));
      raise(SIGKILL);
    }
    for (int p = 0; p < size; ++p) {
      if (p == g_rank || is_dead(p)) continue;
      MPI_Isend(out.data(), int(elems), MPI_FLOAT, p, round, comm, &sends[size_t(p)]);
    }
    if (victim_round) {
      MPI_Waitall(size, sends.data(), MPI_STATUSES_IGNORE);
      say("kill round=" + std::to_string(round));
      raise(SIGKILL);
    }
    // Poll; a peer that dies meanwhile gets its receive cancelled and its send, if still
    // pending, abandoned.
    const double t0 = now_s();
    for (bool all = false; !all;) {
      all = true;
      for (int p = 0; p < size; ++p) {
        for (std::vector<MPI_Request>* reqs : {&recvs, &sends}) {
          MPI_Request& r = (*reqs)[size_t(p)];
          if (r == MPI_REQUEST_NULL) continue;
          int done = 0;
          const int rc = MPI_Test(&r, &done, MPI_STATUS_IGNORE);
          if (rc != MPI_SUCCESS) {
            say("test_error peer=" + std::to_string(p) + " rc=" + std::to_string(rc));
            r = MPI_REQUEST_NULL;
            continue;
          }
          if (done) continue;
          if (is_dead(p) && reqs == &sends) {
            // A send can't be cancelled once started (ob1); let it go, never wait for it.
            MPI_Request_free(&r);
            say("abandon send peer=" + std::to_string(p) + " round=" + std::to_string(round));
            continue;
          }
          if (is_dead(p)) {
            MPI_Cancel(&r);
            MPI_Status st;
            MPI_Wait(&r, &st);
            int cancelled = 0;
            MPI_Test_cancelled(&st, &cancelled);
            say(std::string("cancel ") + (reqs == &recvs ? "recv" : "send") +
                " peer=" + std::to_string(p) + " round=" + std::to_string(round) +
                " cancelled=" + std::to_string(cancelled));
            continue;
          }
          all = false;
        }
      }
      if (!all && now_s() - t0 > stuck_s) {
        say("stuck round=" + std::to_string(round));
        _exit(3);
      }
    }
  }
  stop_watch = true;
  if (watcher.joinable()) watcher.join();
  say("rounds_done=" + std::to_string(rounds) + " events=" + std::to_string(g_events.load()) +
      " dead_mask=" + std::to_string(g_dead_mask.load()));
  if (finalize == "exit") {
    say("exit_without_finalize");
    std::fflush(stdout);
    _exit(exit_code);
  }
  if (finalize_timeout_s > 0) {
    std::thread([finalize_timeout_s] {
      std::this_thread::sleep_for(std::chrono::duration<double>(finalize_timeout_s));
      say("finalize_hung");
      _exit(4);
    }).detach();
  }
  say("finalize_enter");
  MPI_Comm_free(&comm);
  MPI_Finalize();
  say("finalize_returned");
  return exit_code;
}
