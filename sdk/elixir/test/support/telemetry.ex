defmodule :telemetry do
  @moduledoc false
  # A stand-in for the :telemetry library, which the host application would provide and which
  # cannot be fetched here: `execute/3` with the library's signature, forwarding every event
  # to the process UroRecs.TelemetryRecorder names. The client finds it the way it finds the
  # real one (the module is loaded and exports execute/3).
  def execute(event, measurements, metadata) do
    case :persistent_term.get(UroRecs.TelemetryRecorder, nil) do
      nil -> :ok
      pid -> send(pid, {:telemetry, event, measurements, metadata})
    end

    :ok
  end
end

defmodule UroRecs.TelemetryRecorder do
  @moduledoc false
  def record(pid), do: :persistent_term.put(__MODULE__, pid)
  def stop, do: :persistent_term.erase(__MODULE__)
end
