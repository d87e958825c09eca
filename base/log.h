// Rank-tagged spdlog loggers, one per subsystem: "train", "coll", "data", "ckpt".
// Rank 0 logs at the configured level; other ranks only warnings and errors, so that
// progress appears once per job while every rank can still report trouble.
#pragma once

#include <spdlog/spdlog.h>

#include <memory>
#include <string>

namespace resync::log {

// Creates (or reconfigures) the subsystem loggers for this process. Safe to call again once
// the rank is known. `level` is an spdlog level name: trace, debug, info, warn, error, off.
void init(int rank, const std::string& level);

// Returns the named subsystem logger; creates it with the current settings if needed.
std::shared_ptr<spdlog::logger> get(const std::string& subsystem);

// True if `level` names an spdlog level.
bool valid_level(const std::string& level);

}  // namespace resync::log
