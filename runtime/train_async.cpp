// Asynchronous parameter-server training (--mode async). Not built yet: rejected as bad input.
#include "base/error.h"
#include "runtime/train.h"

namespace resync::runtime {

SummaryRecord train_async(const TrainConfig&, collectives::MpiSession&) {
  throw InvalidArgument("--mode async is not available in this build yet");
}

}  // namespace resync::runtime
