defmodule UroRecs do
  @moduledoc """
  The Elixir client of uro-recs, the recommendation sidecar (see docs/PROTOCOL.md in the
  repository): msgpack bodies (`UroRecs.Msgpack`) over ZMTP 3.x (`UroRecs.ZMTP`), both pure
  modules with no process and no dependency.
  """
end
