"""What every vmattach process shares: errors and their one code table,
configuration, database set-up, the command runner, RPC server and client
set-up, secrets, locks and validation."""
