//! Online partition moves between shards: plan, copy, catch up, fence, cut over, clean up. Filled in by the rebalancing issue.
