defmodule UroRecs.Telemetry do
  @moduledoc """
  `:telemetry` events of every call, when the host application has `:telemetry` loaded;
  nothing (and no cost beyond one check) when it does not. The library does not depend on it.

    * `[:uro_recs, :request, :start]`: measurements `%{system_time, monotonic_time}`.
    * `[:uro_recs, :request, :stop]`: measurements `%{duration, monotonic_time}`; metadata
      also has `result` (`:ok` or `:error`) and `error` (`%UroRecs.Error{}` or `nil`).
    * `[:uro_recs, :request, :exception]`: measurements `%{duration, monotonic_time}`;
      metadata also has `kind`, `reason` and `stacktrace`. Only for raises and exits (an
      invalid argument, say): errors the broker or the connection report are `:stop` events
      with `result: :error`.

  Metadata of all three: `client` (the pool's name), `op` (`:recommend`, `:predict`, ...),
  `model` (a name, or `nil` for ops without one). Durations are in `:native` time units
  (`System.convert_time_unit/3`).
  """

  @doc false
  @spec span(map(), (() -> {:ok, term()} | {:error, UroRecs.Error.t()})) ::
          {:ok, term()} | {:error, UroRecs.Error.t()}
  def span(metadata, fun) do
    if function_exported?(:telemetry, :execute, 3) do
      measured_span(metadata, fun)
    else
      fun.()
    end
  end

  defp measured_span(metadata, fun) do
    start = System.monotonic_time()
    execute(:start, %{system_time: System.system_time(), monotonic_time: start}, metadata)

    try do
      fun.()
    catch
      kind, reason ->
        stop = System.monotonic_time()
        extra = %{kind: kind, reason: reason, stacktrace: __STACKTRACE__}
        measurements = %{duration: stop - start, monotonic_time: stop}
        execute(:exception, measurements, Map.merge(metadata, extra))
        :erlang.raise(kind, reason, __STACKTRACE__)
    else
      outcome ->
        stop = System.monotonic_time()

        extra =
          case outcome do
            {:ok, _} -> %{result: :ok, error: nil}
            {:error, error} -> %{result: :error, error: error}
          end

        measurements = %{duration: stop - start, monotonic_time: stop}
        execute(:stop, measurements, Map.merge(metadata, extra))
        outcome
    end
  end

  # apply/3, so that compiling without :telemetry present gives no warning.
  defp execute(event, measurements, metadata),
    do: apply(:telemetry, :execute, [[:uro_recs, :request, event], measurements, metadata])
end
