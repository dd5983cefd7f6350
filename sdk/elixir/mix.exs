defmodule UroRecs.MixProject do
  use Mix.Project

  def project do
    [
      app: :uro_recs,
      version: "0.1.0",
      elixir: "~> 1.14",
      elixirc_paths: elixirc_paths(Mix.env()),
      start_permanent: Mix.env() == :prod,
      deps: []
    ]
  end

  def application do
    [extra_applications: [:logger]]
  end

  # No runtime dependencies and no NIFs: the library is pure Elixir, so it builds on machines
  # that cannot fetch Hex packages.
  defp elixirc_paths(:test), do: ["lib", "test/support"]
  defp elixirc_paths(_), do: ["lib"]
end
