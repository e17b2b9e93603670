"""KnowZoom kg_qa_builder package."""
