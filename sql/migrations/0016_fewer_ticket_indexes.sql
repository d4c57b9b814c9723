-- Every ticket written paid for seven index entries. The per-person count (what a user holds or
-- bought for an event) reads the user's few tickets through tickets_user just as well.
DROP INDEX tickets_user_event;
